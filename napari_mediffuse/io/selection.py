"""Choosing one series among those an input holds, and overriding its modality.

Shared by the CLI (``--series``, ``--modality``) and the panel's scan box.
"""
from __future__ import annotations

from .errors import ReadError
from .volume import Volume

__all__ = ["MODALITIES", "select_series", "override_modality", "series_listing"]

#: Modalities a user may force (the tasks know CT and MR).
MODALITIES = ("CT", "MR")


def series_listing(volumes: list[Volume]) -> str:
    """'0: abdomen (CT), 1: topogram (CT) [localizer]' -- what ``--series`` takes."""
    return ", ".join(f"{k}: {v.name}" for k, v in enumerate(volumes))


def select_series(volumes: list[Volume], series: str | int | None = None, *, where: str = "") -> Volume:
    """The volume ``series`` names among ``volumes`` (as :func:`io.read` returns them).

    Parameters
    ----------
    volumes : list of Volume
        The series of one input, in reading order.
    series : str or int, optional
        Its index in ``volumes`` (0, 1, ...), its SeriesInstanceUID, or text
        found (case-insensitively) in exactly one volume's name or
        SeriesDescription. None: the only volume that is neither a
        localizer nor a segmentation (a DICOM SEG read with its series).
    where : str
        The input path, to start error messages.

    Raises
    ------
    ReadError
        Nothing or several volumes match; the message lists the choices.
    """
    prefix = f"{where}: " if where else ""
    if series is None or str(series).strip() == "":
        main = [v for v in volumes  # the scan: not a localizer, not a segmentation beside it
                if not v.metadata.get("localizer") and v.metadata.get("layer_type") != "labels"]
        main = main or volumes
        if len(main) == 1:
            return main[0]
        raise ReadError(f"{prefix}holds {len(volumes)} series ({series_listing(volumes)}); "
                        "choose one with --series INDEX|UID|DESCRIPTION (or pass one series "
                        "folder or file)")
    text = str(series).strip()
    if text.isdigit():
        index = int(text)
        if index >= len(volumes):
            raise ReadError(f"{prefix}--series {index}: there are only {len(volumes)} series "
                            f"({series_listing(volumes)})")
        return volumes[index]
    by_uid = [v for v in volumes if v.metadata.get("series_instance_uid") == text]
    if len(by_uid) == 1:
        return by_uid[0]
    needle = text.lower()
    found = by_uid or [v for v in volumes
                       if needle in v.name.lower()
                       or needle in str(v.metadata.get("series_description", "")).lower()]
    exact = [v for v in found if v.name.lower() == needle]
    if len(found) == 1 or len(exact) == 1:
        return (exact or found)[0]
    if not found:
        raise ReadError(f"{prefix}--series {text!r} matches no series ({series_listing(volumes)})")
    raise ReadError(f"{prefix}--series {text!r} matches {len(found)} series "
                    f"({', '.join(v.name for v in found)}); give its index "
                    f"({series_listing(volumes)})")


def override_modality(volume: Volume, modality: str | None) -> Volume:
    """Set ``volume.modality`` (and its metadata) to ``modality`` ('CT'/'MR').

    None keeps the modality read (DICOM's Modality tag, or the NIfTI guess).
    The override is recorded in ``metadata['modality_override']`` so results
    can say the user chose it.
    """
    if modality is None:
        return volume
    modality = str(modality).upper()
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    if modality != volume.modality:
        volume.metadata["modality_override"] = {"read": volume.modality, "chosen": modality}
    volume.modality = modality
    if "modality" in volume.metadata:
        volume.metadata["modality"] = modality
    return volume
