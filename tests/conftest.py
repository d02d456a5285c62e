import pytest
import torch

from v2flow import V2FlowTokenizer
from v2flow.testing import TINY_CONFIG, tiny_tokenizer, tiny_vocabulary  # noqa: F401 (re-exported to the tests)

TINY = TINY_CONFIG


def make_tokenizer(**overrides) -> V2FlowTokenizer:
    return tiny_tokenizer(**overrides)


@pytest.fixture
def tokenizer() -> V2FlowTokenizer:
    return make_tokenizer()


@pytest.fixture
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(3, 1, 8, 8, generator=g) * 2 - 1


def tiny_run_args(tmp_path) -> list[str]:
    """Command-line overrides that make configs/quickstart.yaml tiny: a random 200x576 vocabulary table of which
    64 rows are used, 4 tokens, 64 training and 16 validation digits, batches of 8."""
    from safetensors.torch import save_file

    table = tmp_path / "table.safetensors"
    save_file({"embeddings": torch.randn(200, 576, generator=torch.Generator().manual_seed(0))}, table)
    return [
        "--config",
        "configs/quickstart.yaml",
        f"--model.tokenizer.init_args.vocab_source={table}",
        "--model.tokenizer.init_args.num_entries=64",
        "--model.tokenizer.init_args.num_tokens=4",
        "--data.init_args.train_limit=64",
        "--data.init_args.val_limit=16",
        "--data.init_args.batch_size=8",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        "--trainer.val_check_interval=2",
        "--trainer.enable_progress_bar=false",
    ]


@pytest.fixture
def tiny_run(tmp_path) -> list[str]:
    return tiny_run_args(tmp_path)
