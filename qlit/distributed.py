"""The one collective qlit calls itself: gathering Python objects from every rank."""

from __future__ import annotations

from typing import Any, TypeVar

import torch

T = TypeVar("T")


def gather_objects(obj: T, world_size: int) -> list[T]:
    """``obj`` from every rank, in rank order (a collective: every rank must call it); ``[obj]`` when alone."""
    dist = torch.distributed
    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered
