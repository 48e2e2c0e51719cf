"""train.py's own flags: `--help` lists every config key with its default and meaning, read from config.py's
schema (the dataclass fields and their trailing comments), so it never drifts; `--print-config` prints the
resolved config as YAML. Neither starts a process group."""
from __future__ import annotations

import ast
import dataclasses
import io
import tokenize

import config

USAGE = """\
usage: python train.py [--help] [--print-config] [config=<preset>] [key=value ...]
       torchrun --nproc-per-node=<replicas x stages x lanes> train.py [config=<preset>] [key=value ...]

Pipeline-parallel LLM training on unreliable machines. Settings: the defaults below, then configs/<preset>.yaml
(config=default unless given; a .yaml path works too), then the key=value overrides, e.g.
  torchrun --nproc-per-node=4 train.py parallel.replicas=2 parallel.stages=2 train.steps=100

  --help          print this and exit
  --print-config  print the resolved config (preset and overrides applied) as YAML and exit

After a run, `python -m recovery.export <run_dir>/checkpoints/step_<N> <out dir>` writes the model as one file
(Hugging Face Llama parameter names; replicas averaged) with its config.yaml.
"""


def field_comments(source: str) -> dict[tuple[str, str], str]:
    """(class name, field name) -> the field's trailing `# comment`, with the comment lines that continue it
    joined into one line."""
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    lines = source.splitlines()
    out = {}
    for cls in ast.parse(source).body:
        if not isinstance(cls, ast.ClassDef):
            continue
        for node in cls.body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                line = node.end_lineno
                parts = [comments[line]] if line in comments else []
                while parts and line < len(lines) and lines[line].strip().startswith("#"):
                    line += 1
                    parts.append(comments[line])
                out[cls.name, node.target.id] = " ".join(parts)
    return out


def show(value) -> str:
    """A default as it is written on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if value == "" or value == []:
        return "''" if value == "" else "[]"
    return str(value)


def options() -> list[tuple[str, list[tuple[str, str, str]]]]:
    """[(section, its docstring's first line), [(key, default, meaning), ...]] in schema order."""
    with open(config.__file__) as fh:
        comments = field_comments(fh.read())
    defaults, out = config.Config(), []
    for section in dataclasses.fields(config.Config):
        node = getattr(defaults, section.name)
        doc = (type(node).__doc__ or "").strip()  # a dataclass without one gets its signature
        heading = " ".join(doc.split("\n\n")[0].split()) if not doc.startswith(type(node).__name__ + "(") else ""
        rows = [(f"{section.name}.{f.name}", show(getattr(node, f.name)), comments.get((type(node).__name__, f.name), ""))
                for f in dataclasses.fields(node)]
        out.append((f"{section.name}: {heading}" if heading else f"{section.name}:", rows))
    return out


def help_text() -> str:
    sections = options()
    text = [USAGE]
    for heading, rows in sections:
        text.append(f"\n{heading}\n")
        text += [f"  {f'{k}={d}':<42}  {meaning}\n" for k, d, meaning in rows]
    return "".join(text)


def answer(argv: list[str]) -> bool:
    """Handle --help / --print-config (True: printed, the caller exits 0); anything else is training's."""
    if "--help" in argv or "-h" in argv:
        print(help_text(), end="")
        return True
    if "--print-config" in argv:
        print(config.to_yaml(config.load_config([a for a in argv if a != "--print-config"])), end="")
        return True
    return False
