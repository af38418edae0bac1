import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pathlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def repo_root():
    return REPO


@pytest.fixture(autouse=True, scope="session")
def _fp32_unless_asked():
    """`train.mixed_precision: auto` picks bf16 autocast on CPUs with AVX512-BF16/AMX, and CI's CPU
    may or may not have it: tests compare exact numbers, so in-process runs see a machine without
    native bf16 (subprocess tests pass --mixed_precision no to accelerate launch). Its own patcher:
    a test's monkeypatch.undo() must not undo it, and module-scoped fixtures run under it too. tests/test_engine.py checks the choice itself."""
    from align import accel

    patch = pytest.MonkeyPatch()
    patch.setattr(accel, "native_bf16", lambda: False)
    yield
    patch.undo()


@pytest.fixture(autouse=True)
def _run_from_repo(monkeypatch):
    """Recipes name data relative to the repository root, as the README's commands run there."""
    monkeypatch.chdir(REPO)


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    """`family_dir("qwen2")` -> the folder of a tiny random-weight model of that family with its
    tokenizer conventions (tests/families.py), built on first request and kept for the session."""
    from families import build_family

    root = tmp_path_factory.mktemp("families")
    built: dict[str, pathlib.Path] = {}

    def get(name: str) -> pathlib.Path:
        if name not in built:
            built[name] = build_family(name, root)
        return built[name]

    return get
