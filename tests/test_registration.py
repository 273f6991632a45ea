"""CPL is a PEFT method: registered once, idempotently, reachable through PEFT's own mappings."""

import glob
import importlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from peft import PeftConfig, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import peft_cpl
from peft_cpl import CPLConfig, CPLModel
from peft_cpl.tuner._registration import register

from .conftest import tiny_llama


def test_peft_type_member_exists_and_maps():
    assert PeftType.CPL == "CPL"
    assert PeftType("CPL") is PeftType.CPL
    assert PeftType.CPL in list(PeftType)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.CPL] is CPLConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.CPL] is CPLModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.CPL] == "cpl_"


def test_registration_is_idempotent():
    members = len(list(PeftType))
    register()
    register()
    importlib.reload(peft_cpl)
    assert len(list(PeftType)) == members
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.CPL].__name__ == "CPLModel"


def test_get_peft_model_and_trainable_parameter_count(capsys):
    model = get_peft_model(tiny_llama(), CPLConfig(target_modules=["q_proj"], support="random", density=0.25))
    trainable, _total = model.get_nb_trainable_parameters()
    # two q_proj layers of 64x64, a quarter of each
    assert trainable == 2 * round(0.25 * 64 * 64)
    model.print_trainable_parameters()
    assert f"trainable params: {trainable:,}" in capsys.readouterr().out


def test_config_round_trips_through_json(tmp_path):
    config = CPLConfig(target_modules=["q_proj"], support="magnitude", density=0.1, granularity="row", seed=3)
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "CPL" and data["density"] == 0.1
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, CPLConfig)
    assert (loaded.support, loaded.density, loaded.granularity, loaded.seed) == ("magnitude", 0.1, "row", 3)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"support": "gradient"}, "support"),
        ({"granularity": "column"}, "granularity"),
        ({"delta_dtype": "int8"}, "delta_dtype"),
        ({"density": 0.0}, "density"),
        ({"density": 1.5}, "density"),
        ({"density": "0.1"}, "density"),
        ({"support": "random"}, "density"),
        ({"support": "dense", "density": 0.5}, "density"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"CPLConfig\.{field}"):
        CPLConfig(**kwargs)


ENUM_CHECK = """
import enum, importlib.util, sys
spec = importlib.util.spec_from_file_location("reg", sys.argv[1])
reg = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reg)

class Kind(str, enum.Enum):
    LORA = "LORA"
    IA3 = "IA3"

first = reg.add_enum_member(Kind, "CPL")
again = reg.add_enum_member(Kind, "CPL")
assert first is again is Kind.CPL is Kind("CPL") is Kind["CPL"]
assert Kind.CPL == "CPL" and Kind.CPL.value == "CPL" and Kind.CPL.name == "CPL"
assert [k.name for k in Kind] == ["LORA", "IA3", "CPL"] and len(Kind) == 3
assert "CPL" in [k for k in Kind] and {Kind.CPL: 1}["CPL"] == 1
print("ok", sys.version_info[:2])
"""


@pytest.mark.parametrize("version", ["3.10", "3.11", "3.12", "3.13"])
def test_enum_extension_works_on_each_supported_python(version, tmp_path):
    interpreter = _find_python(version)
    if interpreter is None:
        pytest.skip(f"python{version} is not installed here")
    script = tmp_path / "check.py"
    script.write_text(ENUM_CHECK)
    source = Path(peft_cpl.__file__).parent / "tuner" / "_registration.py"
    result = subprocess.run([interpreter, str(script), str(source)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


def _find_python(version: str) -> str | None:
    """A working interpreter of that version: on PATH, or installed by pyenv (whose shims may be inactive)."""
    candidates = [shutil.which(f"python{version}")]
    candidates += sorted(glob.glob(str(Path.home() / f".pyenv/versions/{version}.*/bin/python{version}")))
    for candidate in filter(None, candidates):
        probe = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True)
        if probe.returncode == 0:
            return candidate
    return None
