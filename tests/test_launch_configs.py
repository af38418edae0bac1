"""Every launch config loads with accelerate's own config loader and says what its name says."""

import pathlib

import pytest
from accelerate.commands.config.config_args import load_config_from_file

LAUNCH = pathlib.Path(__file__).resolve().parents[1] / "launch"

EXPECTED = {
    "single_gpu.yaml": ("NO", None),
    "multi_gpu.yaml": ("MULTI_GPU", None),
    "zero2.yaml": ("DEEPSPEED", 2),
    "zero3.yaml": ("DEEPSPEED", 3),
    "zero3_offload.yaml": ("DEEPSPEED", 3),
    "fsdp2.yaml": ("FSDP", None),
}


def test_every_config_is_listed():
    assert sorted(p.name for p in LAUNCH.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_launch_config_loads(name):
    config = load_config_from_file(str(LAUNCH / name))
    kind, zero = EXPECTED[name]
    assert str(config.distributed_type).endswith(kind)
    assert config.mixed_precision == "bf16"
    if zero is not None:
        assert config.deepspeed_config["zero_stage"] == zero
    if name == "zero3_offload.yaml":
        assert config.deepspeed_config["offload_param_device"] == "cpu"
    if name == "fsdp2.yaml":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def test_slurm_script_derives_processes_from_the_config():
    text = (LAUNCH / "slurm.sh").read_text()
    assert "num_processes" in text and "--machine_rank" in text and "SLURM_NODEID" in text
