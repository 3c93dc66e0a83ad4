"""Both build entry points, `knnssd index build` and `python -m index.job`, offer every build setting
(index.settings.BuildSettings) under the same flag and parse the same command line to the same settings;
neither builds an index the serving router would refuse unless it is an experiment. Nothing is built: the
CLI's build is replaced by one that records its settings."""

from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from engine.config import DraftConfig
from index import build as build_module
from index.cli import index_app
from index.job import JOB_DEFAULTS, parse_args, parser
from index.options import flags
from index.runners import EngineIdentity, run_pooled
from index.search import DomainResult, SearchSettings
from index.settings import BuildSettings

REPO = Path(__file__).resolve().parents[2]
SCALAR_FIELDS = {n for n in BuildSettings.model_fields if n != "general_candidates"}
# The flags scripts/rebuild_default_index.sh, the README, k8s/ and the Ray job test pass.
KNOWN_FLAGS = ("--data d --out o --budget 16 --measure-prompts 3 --measure-rounds 3 --max-new-tokens 32 --general-prompts 6 "
               "--confirm-prompts 8 --select-rounds 2 --select-tokens 96 --no-progress --no-general --workers 2 --seed 1 --k 2 "
               "--model smollm2 --screen-prompts 1 --n-measure 1 --layer-profile-prompts 1")  # fmt: skip


class Built(Exception):
    """Raised by the recording build so that nothing runs."""


@pytest.fixture
def cli_settings(monkeypatch):
    """argv -> (exit code, output, the BuildSettings `knnssd index build` would build or None)."""
    seen: list[BuildSettings] = []

    def record(settings, *a, **kw):
        seen.append(settings)
        raise Built

    monkeypatch.setattr(build_module, "build", record)

    def run(argv: str):
        r = CliRunner().invoke(index_app, ["build", *shlex.split(argv)])
        return r.exit_code, r.output, (seen.pop() if seen else None)

    return run


def _cli_options() -> set[str]:
    cmd = get_command(index_app).commands["build"]
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} - {"--help"}


def _job_options() -> set[str]:
    return {o for a in parser()._actions for o in a.option_strings} - {"-h", "--help"}


def test_every_scalar_setting_is_a_flag_of_both_entry_points():
    expected = set()
    for f in flags(BuildSettings):
        expected |= {f.option, f"--no-{f.option[2:]}"} if f.type is bool else {f.option}
    assert {f.name for f in flags(BuildSettings)} == SCALAR_FIELDS  # a dict of configs is no flag
    assert all(f.help for f in flags(BuildSettings))
    assert _cli_options() - expected == {"--threads", "--experiment"}
    assert _job_options() - expected == {"--num-cpus-per-task", "--redis-url", "--redis-prefix", "--ray-address"}
    assert expected <= _cli_options() and expected <= _job_options()


def test_both_entry_points_parse_the_same_flags_to_the_same_settings(cli_settings):
    # (--workers given: its default is the one the entry points do not share)
    for argv in (KNOWN_FLAGS, "--data d --out o --representation minilm --select-level 0.8 --threshold-quantile 0.1 --progress --general --workers 3"):
        code, out, from_cli = cli_settings(argv)
        assert code == 1 and from_cli is not None, out
        assert parse_args(shlex.split(argv)).settings == from_cli
    assert from_cli.select_level == 0.8 and from_cli.progress and from_cli.general


def test_defaults_are_the_settings_defaults_but_the_jobs_workers(cli_settings):
    _, _, from_cli = cli_settings("--data d --out o")
    assert from_cli == BuildSettings(data="d", out="o") and from_cli.workers == 1
    assert parse_args(["--data", "d", "--out", "o"]).settings == BuildSettings(data="d", out="o", **JOB_DEFAULTS)
    assert JOB_DEFAULTS == {"workers": 2}


def _commands(text: str, marker: str) -> list[str]:
    """Every command in `text` that runs `marker`: continuation lines joined, up to the next `;`, `&&`, `|`
    or backtick."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [re.split(r"[;|`]|&&", line[line.index(marker) :])[0] for line in joined.splitlines() if marker in line]


def test_every_flag_the_docs_scripts_and_manifests_pass_still_exists():
    files = [REPO / "README.md", *(REPO / "scripts").glob("*.sh"), *(REPO / "k8s").glob("*.yaml"), REPO / "docker/Dockerfile"]
    texts = "\n".join(f.read_text() for f in files)
    used = {"index build": _cli_options(), "index.job": _job_options()}
    for marker, options in used.items():
        commands = _commands(texts, marker)
        assert commands, marker
        for cmd in commands:
            assert set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", cmd)) <= options | {"--help"}, cmd
    a = parse_args(shlex.split(KNOWN_FLAGS))
    assert (a.settings.budget, a.settings.workers, a.settings.progress, a.settings.general) == (16, 2, False, False)


def test_invalid_values_are_usage_errors_in_both(cli_settings, capsys):
    code, out, seen = cli_settings("--data d --out o --select-level 1.5")
    assert code == 2 and seen is None
    with pytest.raises(SystemExit) as e:
        parse_args(["--data", "d", "--out", "o", "--select-level", "1.5"])
    assert e.value.code == 2 and "--select-level" in capsys.readouterr().err


def test_an_index_the_router_refuses_is_only_built_as_an_experiment(cli_settings, capsys):
    code, out, seen = cli_settings("--data d --out o --representation llm-hidden")
    assert code == 2 and seen is None and "router" in out
    code, out, seen = cli_settings("--data d --out o --representation llm-hidden --experiment")
    assert code == 1 and seen is not None and seen.representation == "llm-hidden"
    with pytest.raises(SystemExit) as e:
        parse_args(["--data", "d", "--out", "o", "--representation", "llm-hidden"])
    assert e.value.code == 2 and "router" in capsys.readouterr().err
    assert BuildSettings(data="d", out="o", representation="llm-hidden").unservable()  # the Python API still builds it
    assert BuildSettings(data="d", out="o").unservable() is None


class InlinePool:
    """A TaskPool that fakes the tasks' results and records how many ran at once."""

    def __init__(self):
        self.running: dict[int, tuple] = {}
        self.most = 0
        self.ids = itertools.count()

    def submit(self, fn, *args):
        assert fn.__name__ == "search_task"
        handle = next(self.ids)
        self.running[handle] = args
        self.most = max(self.most, len(self.running))
        return handle

    def wait(self, handles):
        return [handles[0]]

    def result(self, handle):
        _w, name, *_ = self.running.pop(handle)
        if name == "broken":
            raise RuntimeError("task failed")
        return EngineIdentity("fake", "f" * 64, 8), DomainResult(
            name=name, config=DraftConfig.plain(), speedup=1.0, acceptance=0.0, mean_accepted_tokens=1.0
        )


def test_pooled_runs_cap_tasks_in_flight_and_fail_on_a_failed_task():
    s = BuildSettings(data="d", out="o", workers=2, general=False, progress=False)
    domains = {n: [] for n in ("a", "b", "c", "d", "e")}
    pool = InlinePool()
    ident, results, general = run_pooled(pool, None, domains, SearchSettings(), s)
    assert set(results) == set(domains) and general is None and ident.model_id == "fake"
    assert pool.most == 2
    with pytest.raises(RuntimeError, match="task failed"):
        run_pooled(InlinePool(), None, {**domains, "broken": []}, SearchSettings(), s)


def test_the_search_gets_the_settings_named_like_its_own():
    shared = set(SearchSettings.model_fields) & set(BuildSettings.model_fields)
    # a new SearchSettings field named like a build setting would silently take its value: say so here
    assert shared == {"budget", "seed", "max_new_tokens", "measure_prompts", "screen_prompts", "n_measure", "measure_rounds", "layer_profile_prompts"}
    s = BuildSettings(data="d", out="o", budget=5, seed=3, layer_profile_prompts=0).search_settings()
    assert (s.budget, s.seed, s.layer_profile_prompts) == (5, 3, 0)
