"""Make "CPL" a PEFT method: PeftType has no extension hook, so the member is added by hand.

This module imports nothing from peft at top level so that `add_enum_member` can be checked on every supported
Python without the ML stack (tests/test_registration.py runs it under 3.10-3.13).
"""

from __future__ import annotations

import enum

CPL_NAME = "cpl"
CPL_PREFIX = "cpl_"


def add_enum_member(enum_cls: type[enum.Enum], name: str) -> enum.Enum:
    """Add `name` (value == name) to a str-Enum, idempotently, on Python 3.10-3.13."""
    existing = enum_cls._member_map_.get(name)
    if existing is not None:
        return existing
    member = str.__new__(enum_cls, name)
    member._name_ = name
    member._value_ = name
    if hasattr(next(iter(enum_cls)), "_sort_order_"):  # 3.11+ orders members by this
        member._sort_order_ = len(enum_cls._member_names_)
    # 3.12+ resolves `EnumCls.NAME` through the class dict, not only _member_map_; bypass EnumType.__setattr__.
    type.__setattr__(enum_cls, name, member)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[name] = member
    enum_cls._member_names_.append(name)
    return member


def register() -> None:
    """Register CPL with PEFT (safe to call any number of times)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType, register_peft_method

    from .config import CPLConfig
    from .model import CPLModel

    peft_type = add_enum_member(PeftType, CPL_NAME.upper())
    if peft_type in PEFT_TYPE_TO_TUNER_MAPPING:
        return
    register_peft_method(name=CPL_NAME, config_cls=CPLConfig, model_cls=CPLModel, prefix=CPL_PREFIX)
