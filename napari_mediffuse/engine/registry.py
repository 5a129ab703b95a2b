"""Where checkpoints are found. Never downloads anything.

Lookup order (first match wins, so a user can shadow a bundled model):

1. an explicit path given by the user (CLI ``--model PATH``, the panel's
   "Browse…"), to a checkpoint folder;
2. folders listed in the ``MEDIFFUSE_MODELS`` environment variable
   (``os.pathsep``-separated); each holds checkpoint folders;
3. the user models folder, :func:`user_models_dir` (platformdirs);
4. the demo checkpoints bundled in the package.

Within one folder, a checkpoint whose card says ``"default": true`` comes
first, so it is the task's default when no model is named (the bundled
multi-patient CT prior over the one-patient demo); otherwise folder names
decide.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .checkpoint import CARD_FILE, Checkpoint, CheckpointError, load_checkpoint, read_card, task_mismatch

ENV_VAR = "MEDIFFUSE_MODELS"


def bundled_models_dir() -> Path:
    return Path(str(resources.files("napari_mediffuse") / "data" / "models"))


def user_models_dir() -> Path:
    """Per-user models folder, e.g. ``~/.local/share/napari-mediffuse/models``."""
    from platformdirs import user_data_path

    return user_data_path("napari-mediffuse", appauthor=False) / "models"


def search_dirs() -> list[tuple[str, Path]]:
    """(origin, folder) pairs in lookup order."""
    dirs = [("env", Path(p)) for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p.strip()]
    dirs.append(("user", user_models_dir()))
    dirs.append(("bundled", bundled_models_dir()))
    return dirs


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint found on disk, described by its card (weights not loaded)."""

    name: str
    path: Path
    origin: str  # 'path', 'env', 'user' or 'bundled'
    task: str
    modality: str
    summary: str
    default: bool = False  # the card asks to be its task's default within its folder

    def label(self) -> str:
        """Text for model choosers: name, origin and the card's summary."""
        text = f"{self.name} [{self.origin}]"
        return f"{text}: {self.summary}" if self.summary else text


def _info(path: Path, origin: str) -> CheckpointInfo:
    card = read_card(path)
    return CheckpointInfo(name=card.get("name", path.name), path=path, origin=origin,
                          task=card["task"], modality=card["modality"],
                          summary=card.get("summary", ""), default=bool(card.get("default", False)))


def list_checkpoints(task: str | tuple[str, ...] | None = None,
                     modality: str | None = None) -> list[CheckpointInfo]:
    """All checkpoints in the search folders, in lookup order, names unique
    (``task``: one task or several, e.g. a task that runs priors or its own models)."""
    tasks = (task,) if isinstance(task, str) else task
    found: dict[str, CheckpointInfo] = {}
    for origin, folder in search_dirs():
        if not folder.is_dir():
            continue
        infos = []
        for sub in sorted(folder.iterdir()):
            if not (sub / CARD_FILE).is_file():
                continue
            try:
                infos.append(_info(sub, origin))
            except CheckpointError:
                continue  # listed by check_models_dir(); not fatal for lookup
        for info in sorted(infos, key=lambda i: not i.default):  # stable: names decide among equals
            if info.name in found:
                continue
            if tasks is not None and info.task not in tasks:
                continue
            if modality is not None and info.modality not in (modality, "any"):
                continue
            found[info.name] = info
    return list(found.values())


def resolve_checkpoint(name_or_path: str | os.PathLike | None = None, *, task: str | tuple[str, ...] | None = None,
                       modality: str | None = None) -> CheckpointInfo:
    """Find a checkpoint by path, by name, or the default one for ``task``.

    Raises
    ------
    CheckpointError
        Nothing found (the message lists what is available and where it
        looked), or the checkpoint is for another task or modality.
    """
    if name_or_path is not None:
        path = Path(name_or_path).expanduser()
        if path.is_dir():
            info = _info(path, "path")
            _check(info, task, modality)
            return info
        if os.sep in str(name_or_path) or path.suffix:
            raise CheckpointError(f"{path}: no such checkpoint folder")
        for info in list_checkpoints():
            if info.name == str(name_or_path):
                _check(info, task, modality)
                return info
        raise CheckpointError(f"no checkpoint named {str(name_or_path)!r}; {_available(task)}")
    candidates = list_checkpoints(task=task, modality=modality)
    if task is not None and not isinstance(task, str):
        # several tasks: the first task's models before the next's (sorted is stable: within a
        # task the lookup order stands, defaults first)
        candidates = sorted(candidates, key=lambda info: tuple(task).index(info.task))
    if not candidates:
        kind = task if isinstance(task, str) or task is None else " or ".join(task)
        raise CheckpointError(f"no {kind or ''} checkpoint{' for ' + modality if modality else ''} found; "
                              f"{_available(task)}")
    return candidates[0]


def load(name_or_path=None, *, task: str | tuple[str, ...] | None = None, modality: str | None = None) -> Checkpoint:
    """:func:`resolve_checkpoint` then :func:`~.checkpoint.load_checkpoint`."""
    info = resolve_checkpoint(name_or_path, task=task, modality=modality)
    return load_checkpoint(info.path, task=task, modality=modality)


def _check(info: CheckpointInfo, task, modality) -> None:
    if (wanted := task_mismatch(info.task, task)) is not None:
        raise CheckpointError(f"checkpoint {info.name!r} ({info.path}) is a {info.task!r} model; "
                              f"this needs {wanted}")
    if modality is not None and info.modality not in (modality, "any"):
        raise CheckpointError(f"checkpoint {info.name!r} ({info.path}) was trained on {info.modality}; "
                              f"the input is {modality}")


def _available(task) -> str:
    names = [f"{i.name} ({i.origin})" for i in list_checkpoints(task=task)]
    where = ", ".join(str(folder) for _, folder in search_dirs())
    have = f"available: {', '.join(names)}" if names else "none of that kind installed"
    return f"{have}. Looked in: {where} (set {ENV_VAR} or pass a checkpoint folder path)"
