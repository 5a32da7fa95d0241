"""Request files, the scope table, and progress output: small pieces with no model."""

import io
from dataclasses import replace

import yaml
from click.testing import CliRunner

from seqforget.cli import cli
from seqforget.progress import Progress
from seqforget.requests import load_request
from seqforget.scopes import SCOPES


def _write(folder, **fields):
    (folder / "forget.jsonl").write_text('{"question": "what is the job of ada ?", "answer": "miner"}\n')
    (folder / "retain.jsonl").write_text('{"question": "what is the job of bo ?", "answer": "baker"}\n')
    (folder / "reference.jsonl").write_text('{"question": "what is the job of cy ?", "answer": "nurse"}\n')
    body = {"id": "r1", "scope": "full", "forget": "forget.jsonl", "retain": "retain.jsonl", "reference": "reference.jsonl", **fields}
    (folder / "r1.yaml").write_text(yaml.safe_dump(body))
    return folder / "r1.yaml"


def test_a_request_without_a_method_gets_its_scopes_default(tmp_path):
    for scope in ("full", "refuse"):
        assert load_request(_write(tmp_path, scope=scope)).method == SCOPES[scope].default


def test_steps_and_lr_default_to_the_methods_budget_unless_the_request_sets_them(tmp_path):
    stranger = load_request(_write(tmp_path, method="stranger")).training
    assert (stranger.steps, stranger.lr) == (600, 3e-3)
    gd = load_request(_write(tmp_path, method="gd")).training
    assert (gd.steps, gd.lr) == (30, 1e-3)
    mine = load_request(_write(tmp_path, method="stranger", steps=50, lr=1e-4)).training
    assert (mine.steps, mine.lr) == (50, 1e-4)


def test_a_request_names_its_adapter_kind_beside_its_method(tmp_path):
    """Any loss that trains a LoRA trains a sine residual too, at the kind's budget unless the
    request sets its own; `method: sine` reads as its objective with `adapter: sine`; a kind the
    method cannot train is refused in one line; the default kind leaves a request's identity as
    it was before requests could name one."""
    import pytest
    from seqforget.errors import SeqforgetError

    plain = load_request(_write(tmp_path, method="gd"))
    assert plain.adapter == "lora" and "adapter" not in plain.content()
    assert load_request(_write(tmp_path, method="gd", adapter="lora")).sha256() == plain.sha256()
    sine = load_request(_write(tmp_path, method="gd", adapter="sine"))
    assert (sine.method, sine.adapter, sine.training.steps, sine.training.lr) == ("gd", "sine", 600, 3e-3)
    assert sine.content()["adapter"] == "sine" and sine.sha256() != plain.sha256()
    assert load_request(_write(tmp_path, method="gd", adapter="sine", steps=5)).training.steps == 5
    refusal = load_request(_write(tmp_path, scope="refuse", adapter="sine"))
    assert (refusal.method, refusal.adapter) == ("refusal", "sine")
    old = load_request(_write(tmp_path, method="sine", method_args={"objective": "npo"}))
    assert (old.method, old.adapter, old.method_args) == ("npo", "sine", {})
    assert (load_request(_write(tmp_path, method="sine")).method, old.adapter) == ("stranger", "sine")
    for fields, said in (({"method": "stranger", "adapter": "masked"}, "adapter: stranger trains lora or sine, not 'masked'"),
                         ({"method": "vleraser", "adapter": "sine"}, "adapter: vleraser trains lora, not 'sine'"),
                         ({"method": "gd", "adapter": 3}, "adapter: expected one of lora, sine"),
                         ({"method": "gd", "adapter": ["sine"]}, "adapter: expected one of lora, sine")):
        with pytest.raises(SeqforgetError, match=said):
            load_request(_write(tmp_path, **fields))


def test_a_request_is_known_by_its_content_not_by_where_its_files_lie(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, moved = load_request(_write(tmp_path / "a")), load_request(_write(tmp_path / "b"))
    assert first.source != moved.source and first.sha256() == moved.sha256()
    assert load_request(_write(tmp_path / "b", steps=9)).sha256() != first.sha256()
    path = _write(tmp_path / "b")
    (tmp_path / "b" / "retain.jsonl").write_text('{"question": "what is the job of bo ?", "answer": "cook"}\n')
    assert load_request(path).sha256() != first.sha256()  # other data, other request


def test_a_field_added_later_counts_in_a_requests_identity_only_when_set(tmp_path):
    from seqforget.requests import _LATER, Training
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plain = load_request(_write(tmp_path / "a"))
    assert not set(_LATER) & set(plain.content()["training"])  # what a request committed before them hashed
    assert load_request(_write(tmp_path / "b", targets_from_base=False)).sha256() == plain.sha256()
    set_ = load_request(_write(tmp_path / "b", targets_from_base=True))
    assert set_.training == replace(Training(**vars(plain.training)), targets_from_base=True)
    assert set_.sha256() != plain.sha256()


def test_every_scope_has_a_default_that_serves_it_and_every_method_serves_a_scope():
    from seqforget.methods import METHODS, served

    for name, scope in SCOPES.items():
        assert scope.default in METHODS and served(name)[0] == scope.default, scope
    assert all(cls.scopes and set(cls.scopes) <= set(SCOPES) for cls in METHODS.values())


def test_off_a_terminal_progress_prints_no_line_per_step():
    quiet = io.StringIO()
    with Progress(1000, "apply r1", stream=quiet) as progress:
        for _ in range(1000):
            progress.update(loss=1.0)
    assert quiet.getvalue() == ""  # under `every` seconds: nothing but the caller's summary line
    chatty = io.StringIO()
    with Progress(3, "apply r1", every=0.0, stream=chatty) as progress:
        for _ in range(3):
            progress.update(loss=0.5)
    assert chatty.getvalue().splitlines() == [f"apply r1: step {i}/3 loss 0.500" for i in (1, 2, 3)]


def test_the_demo_reaches_the_cli_as_an_installed_command():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0 and "demo" in result.output
    result = CliRunner().invoke(cli, ["demo", "--help"])
    assert result.exit_code == 0 and "SEQFORGET_CACHE" in result.output
