"""Pages generated at build time (mkdocs-gen-files), so they never drift from the code.

- ``reference/``: one page per module of the package, found by walking ``lenet_xp/``, each
  rendered from its docstrings by mkdocstrings; ``reference/SUMMARY.md`` is its navigation.
- ``cli/``: each command of ``[project.scripts]`` in pyproject.toml gets its ``--help``
  output appended to its hand-written page (or a page of its own), and ``cli/SUMMARY.md``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mkdocs_gen_files

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "lenet_xp"
#: argparse wraps to $COLUMNS: fixed, so the pages do not depend on the terminal.
HELP_COLUMNS = "100"


def write_api_reference() -> None:
    """One ``::: module`` page per Python module of the package (``__main__`` aside)."""
    nav = mkdocs_gen_files.Nav()
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__main__":
            continue
        page = Path("reference", *parts).with_suffix(".md")
        if parts[-1] == "__init__":
            parts = parts[:-1]
            page = page.with_name("index.md")
        nav[tuple(parts)] = page.relative_to("reference").as_posix()
        with mkdocs_gen_files.open(page, "w") as out:
            out.write(f"# `{'.'.join(parts)}`\n\n::: {'.'.join(parts)}\n")
        mkdocs_gen_files.set_edit_path(page, path.relative_to(ROOT))
    with mkdocs_gen_files.open("reference/SUMMARY.md", "w") as out:
        out.writelines(nav.build_literate_nav())


def commands() -> dict[str, str]:
    """``{command name: module}`` from pyproject.toml's scripts: ``train`` -> ``lenet_xp.train``."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    modules = (target.split(":")[0] for target in scripts.values())
    return {module.removeprefix(f"{PACKAGE}."): module for module in modules}


def help_text(module: str) -> str:
    """``python -m MODULE --help``, run from the repository root; a failure fails the build."""
    env = {**os.environ, "COLUMNS": HELP_COLUMNS, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"python -m {module} --help failed: {proc.stderr.strip()}")
    return proc.stdout.rstrip()


def write_cli_pages() -> None:
    """Each command's page ends with its ``--help``; ``cli/SUMMARY.md`` lists them all."""
    summary = ["* [Overview](index.md)\n"]
    for name, module in sorted(commands().items()):
        page = f"cli/{name}.md"
        written = (ROOT / "docs" / page).is_file()
        with mkdocs_gen_files.open(page, "a" if written else "w") as out:
            if not written:
                out.write(f"# {name}\n")
            out.write(f"\n## `python -m {module} --help`\n\n```text\n{help_text(module)}\n```\n")
        summary.append(f"* [{name}]({name}.md)\n")
    with mkdocs_gen_files.open("cli/SUMMARY.md", "w") as out:
        out.writelines(summary)


write_api_reference()
write_cli_pages()
