"""LightningDataModules: one file per dataset on top of :mod:`qlit.data.base`."""

from qlit.data.base import Example, QLitDataModule
from qlit.data.sst2 import SST2DataModule

__all__ = ["Example", "QLitDataModule", "SST2DataModule"]
