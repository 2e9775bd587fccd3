"""The README's promises: the two set-up commands, and the minimal recipe that users copy."""

from __future__ import annotations

import json
import re

from helpers import REPO, run_distrain

README = (REPO / "README.md").read_text()


def test_readme_starts_with_the_two_commands_ci_uses():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1).splitlines()
    assert first_block[0].startswith("make run") and first_block[1].startswith("make test")
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci
    makefile = (REPO / "Makefile").read_text()
    assert "recipe=har" in makefile.split("run:")[1] and "constraints-cpu.txt" in makefile
    assert (REPO / "constraints-cpu.txt").read_text().strip() == "torch==2.13.0"


def test_minimal_recipe_from_readme_trains(tmp_path):
    section = README.split("## Write a recipe", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    recipe = tmp_path / "wine.py"
    recipe.write_text(code)
    out = tmp_path / "run"
    run_distrain([f"recipe={recipe}", f"output_dir={out}", "train.max_epochs=20", "data.batch_size=16",
                  "train.metric=accuracy", "train.mode=max", "log.progress=false"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_metric"]["accuracy"] >= 0.9  # wine is easy; an untrained MLP scores ~0.33
