"""LightningDataModules: one file per dataset on top of :mod:`qlit.data.base`."""

from qlit.data.base import QLitDataModule
from qlit.data.code_search_net import CodeSearchNetDataModule
from qlit.data.indicvault import IndicVaultDataModule
from qlit.data.jsonl import JSONLDataModule
from qlit.data.pricer import PricerDataModule
from qlit.data.render import Example
from qlit.data.squad import SQuADDataModule
from qlit.data.sst2 import SST2DataModule

__all__ = [
    "CodeSearchNetDataModule",
    "Example",
    "IndicVaultDataModule",
    "JSONLDataModule",
    "PricerDataModule",
    "QLitDataModule",
    "SQuADDataModule",
    "SST2DataModule",
]
