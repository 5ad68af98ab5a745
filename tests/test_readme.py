"""The README's research-code example runs as written."""

import os
import re


def test_readme_step_example(capsys):
    text = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "prefill(" in b]
    assert blocks, "README has no step-function example"
    exec(compile(blocks[0], "README.md", "exec"), {})
    assert capsys.readouterr().out.strip().startswith("[")
