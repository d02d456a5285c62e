"""The README's Python example runs as written (against the shipped checkpoint)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_python_example_runs(monkeypatch):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["out"].ids.shape == (8, 32)
    assert namespace["recon"].shape == (8, 1, 32, 32)
    # the LLM example: real SmolLM2, shared vocabulary, a constrained generation the tokenizer decodes
    assert namespace["image_lm"].parse(namespace["batch"]["input_ids"]).tolist() == namespace["ids"].tolist()
    assert namespace["drawn"].shape == (1, 1, 32, 32)
