"""rl/checkpoint.py called directly: what commit writes, pruning, what a crash leaves and how recover and begin clean
it up, which checkpoints count as complete, and the messages for unreadable files."""

from fractions import Fraction
from pathlib import Path

import pytest
import torch

from thinkzero.rl import checkpoint as ckpt


def _save(out: Path, step: int, keep_last: int | None = None, payload: str = "weights") -> Path:
    tmp = ckpt.begin(out, step)
    (tmp / "model.safetensors").write_text(payload)
    ckpt.write_state(tmp, {"step": step}, {"train": {"seed": 0}})
    return ckpt.commit(tmp, out, step, keep_last)


def _names(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir())


# --- commit ---------------------------------------------------------------------------------------------------------

def test_commit_moves_the_temporary_into_place_with_its_marker_last(tmp_path):
    tmp = ckpt.begin(tmp_path, 7)
    assert tmp == tmp_path / ".tmp-checkpoint-000007" and tmp.is_dir()
    ckpt.write_state(tmp, {"step": 7, "weights": torch.arange(3)}, {"train": {"seed": 3}})
    assert ckpt.latest_checkpoint(tmp_path) is None  # nothing is visible before commit
    final = ckpt.commit(tmp, tmp_path, 7, keep_last=None)
    assert final == ckpt.checkpoint_dir(tmp_path, 7) == tmp_path / "checkpoint-000007"
    assert _names(tmp_path) == ["checkpoint-000007"]
    assert (final / ckpt.COMPLETE).read_text() == "7\n"
    state = ckpt.read_state(final)
    assert state["step"] == 7 and torch.equal(state["weights"], torch.arange(3))
    assert ckpt.read_config(final) == {"train": {"seed": 3}}


def test_saving_a_step_again_replaces_it_and_leaves_no_aside(tmp_path):
    _save(tmp_path, 2, payload="old")
    final = _save(tmp_path, 2, payload="new")
    assert (final / "model.safetensors").read_text() == "new"
    assert _names(tmp_path) == ["checkpoint-000002"]


@pytest.mark.parametrize("keep_last,kept", [(None, [1, 2, 3, 4]), (0, [1, 2, 3, 4]), (1, [4]), (2, [3, 4]),
                                            (9, [1, 2, 3, 4])])
def test_pruning_keeps_the_newest(tmp_path, keep_last, kept):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep_last)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [f"checkpoint-{s:06d}" for s in kept]
    assert _names(tmp_path) == [f"checkpoint-{s:06d}" for s in kept]  # pruned ones are gone, not just unmarked


def test_pruning_never_touches_other_directories(tmp_path):
    (tmp_path / "checkpoint-000001").mkdir()  # no marker: not a checkpoint, not pruned
    (tmp_path / "notes").mkdir()
    for step in (2, 3):
        _save(tmp_path, step, keep_last=1)
    assert _names(tmp_path) == ["checkpoint-000001", "checkpoint-000003", "notes"]


def test_remove_drops_the_marker_before_anything_else(tmp_path, monkeypatch):
    final = _save(tmp_path, 1)
    seen = []
    monkeypatch.setattr(ckpt.shutil, "rmtree", lambda path, **kw: seen.append((path / ckpt.COMPLETE).exists()))
    ckpt.remove(final)  # a kill inside rmtree leaves a directory that no longer looks complete
    assert seen == [False] and ckpt.list_checkpoints(tmp_path) == []


# --- which checkpoints count ----------------------------------------------------------------------------------------

def test_only_complete_numbered_directories_are_checkpoints_in_step_order(tmp_path):
    for step in (10, 9, 1_000_000):  # past six digits the name grows; order is by number, not by name
        _save(tmp_path, step)
    (tmp_path / "checkpoint-000011").mkdir()  # renamed in but never marked complete
    (tmp_path / "checkpoint-12").mkdir()
    (tmp_path / "checkpoint-12" / ckpt.COMPLETE).write_text("12\n")  # a marker is enough, whatever the padding
    (tmp_path / "checkpoint-000013").write_text("a file, not a directory")
    (tmp_path / "checkpoint-latest").mkdir()
    (tmp_path / "checkpoint-latest" / ckpt.COMPLETE).write_text("")
    ckpt.begin(tmp_path, 14)  # a write in progress
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-000009", "checkpoint-000010",
                                                                 "checkpoint-12", "checkpoint-1000000"]
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-1000000"


def test_no_output_directory_means_no_checkpoint(tmp_path):
    assert ckpt.list_checkpoints(tmp_path / "absent") == []
    assert ckpt.latest_checkpoint(tmp_path / "absent") is None


def test_reading_an_incomplete_checkpoint_says_why(tmp_path):
    (tmp_path / "checkpoint-000003").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        ckpt.read_state(tmp_path / "checkpoint-000003")
    assert str(err.value) == (f"{tmp_path / 'checkpoint-000003'} is not a complete thinkzero checkpoint "
                              "(no COMPLETE marker)")
    assert ckpt.read_config(tmp_path / "checkpoint-000003") is None


def test_a_truncated_state_file_is_corrupt_and_a_pickle_is_refused(tmp_path):
    final = _save(tmp_path, 1)
    state = final / ckpt.STATE_FILE
    state.write_bytes(state.read_bytes()[:20])
    with pytest.raises(ckpt.CorruptCheckpointFile) as err:
        ckpt.read_state(final)
    message = str(err.value)
    assert message.startswith(f"cannot read {state} (") and message.endswith("): the file is truncated or damaged")
    assert "\n" not in message

    planted = tmp_path / "planted.pt"
    torch.save({"step": 1, "kind": Fraction}, planted)  # a global outside the allow-list
    with pytest.raises(ckpt.UnsafeCheckpointFile) as err:
        ckpt.load_file(planted)
    assert str(err.value).startswith(f"refused to load {planted}: it holds Python objects that are not tensors or "
                                     "plain values (fractions.Fraction is not allowed), so loading it could run code")
    assert ckpt.load_file(planted, safe_types=(Fraction,)) == {"step": 1, "kind": Fraction}


# --- crash leftovers ------------------------------------------------------------------------------------------------

def test_begin_removes_unfinished_writes_of_any_step(tmp_path):
    _save(tmp_path, 1)
    for step in (2, 5):  # kills during earlier writes
        stale = ckpt.tmp_dir(tmp_path, step)
        stale.mkdir()
        (stale / "model.safetensors").write_text("half")
    tmp = ckpt.begin(tmp_path, 5)
    assert list(tmp.iterdir()) == []  # the same step's leftover does not leak into the new write
    assert _names(tmp_path) == [".tmp-checkpoint-000005", "checkpoint-000001"]


def _aside(out: Path, step: int, complete: bool) -> Path:
    aside = out / f"{ckpt.REPLACED}checkpoint-{step:06d}"
    aside.mkdir()
    (aside / "model.safetensors").write_text("aside")
    if complete:
        (aside / ckpt.COMPLETE).write_text(f"{step}\n")
    return aside


def test_recover_puts_back_a_replaced_checkpoint_whose_replacement_never_arrived(tmp_path):
    _aside(tmp_path, 4, complete=True)
    (tmp_path / "checkpoint-000004").mkdir()  # the replacement: renamed in, never marked (or not there at all)
    _aside(tmp_path, 6, complete=True)
    notes = ckpt.recover(tmp_path)
    assert notes == [f"restored {tmp_path / 'checkpoint-000004'}: its replacement was interrupted",
                     f"restored {tmp_path / 'checkpoint-000006'}: its replacement was interrupted"]
    assert _names(tmp_path) == ["checkpoint-000004", "checkpoint-000006"]
    assert (tmp_path / "checkpoint-000004" / "model.safetensors").read_text() == "aside"
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-000006"


def test_recover_drops_an_aside_that_is_not_needed_and_says_nothing(tmp_path):
    _save(tmp_path, 4, payload="new")
    _aside(tmp_path, 4, complete=True)  # the replacement went in: the old copy is surplus
    _aside(tmp_path, 5, complete=False)  # half deleted already: nothing to put back
    assert ckpt.recover(tmp_path) == []
    assert _names(tmp_path) == ["checkpoint-000004"]
    assert (tmp_path / "checkpoint-000004" / "model.safetensors").read_text() == "new"


def test_recover_removes_stale_temporaries_and_is_idempotent(tmp_path):
    _save(tmp_path, 1)
    ckpt.tmp_dir(tmp_path, 2).mkdir()
    (ckpt.tmp_dir(tmp_path, 2) / "model.safetensors").write_text("half")
    removed = f"removed {tmp_path / '.tmp-checkpoint-000002'}, a checkpoint write that never finished"
    assert ckpt.recover(tmp_path) == [removed]
    assert ckpt.recover(tmp_path) == []
    assert _names(tmp_path) == ["checkpoint-000001"]


# --- resuming with a changed recipe ---------------------------------------------------------------------------------

def test_config_changes_refuses_what_changes_meaning_and_lists_the_rest():
    saved = {"train": {"seed": 0, "max_steps": 10}, "optim": {"lr": 1e-5},
             "rewards": [{"name": "format"}], "logging": {"wandb": True}, "model": {"params": {"a": 1}}}
    current = {"train": {"seed": 1, "max_steps": 20}, "optim": {"lr": 2e-5},
               "rewards": [{"name": "format"}], "logging": {"wandb": False}, "model": {"params": {"a": 2}},
               "data": {"path": Path("x.jsonl")}}
    refused, applied = ckpt.config_changes(saved, current)
    assert refused == ["train.seed: 0 -> 1"]
    assert applied == ["data.path: None -> 'x.jsonl'", "model.params: {'a': 1} -> {'a': 2}",
                       "optim.lr: 1e-05 -> 2e-05"]
