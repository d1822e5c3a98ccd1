"""Recipe validation errors as people read them: the key path, the bad value, what is expected,
and a did-you-mean hint for a misspelled key; one line per key, at most :data:`MAX_ERROR_LINES`."""

from __future__ import annotations

from typing import Any, get_args

from pydantic import BaseModel, ValidationError

from finetune.errors import did_you_mean


def format_validation_error(exc: ValidationError, model_cls: type[BaseModel]) -> str:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if not isinstance(p, int)]
        # pydantic adds union branch names ("str", "list[str]") into loc; keep real keys only.
        loc = _real_key_path(model_cls, loc)
        key = ".".join(loc) or "(recipe)"
        etype = err["type"]
        value = err.get("input")
        if etype == "extra_forbidden":
            parent = _model_at(model_cls, loc[:-1])
            fields = list(parent.model_fields) if parent else []
            hint = did_you_mean(loc[-1], fields)
            lines.append(f"{key}: unknown key{hint}. Valid keys in [{'.'.join(loc[:-1])}]: "
                         f"{', '.join(fields)}.")
        elif etype == "missing":
            parent = _model_at(model_cls, loc[:-1])
            info = parent.model_fields.get(loc[-1]) if parent and loc else None
            what = f" ({info.description})" if info is not None and info.description else ""
            lines.append(f"{key}: required key is missing{what}; add it under [{'.'.join(loc[:-1])}].")
        else:
            msg = err["msg"]
            shown = repr(value)
            if len(shown) > 120:
                shown = shown[:100] + f"... ({len(shown):,} characters)"
            lines.append(f"{key}: invalid value {shown} ({type(value).__name__}): {msg}.")
    # one error per key is enough (unions report each branch)
    seen, unique = set(), []
    for line in lines:
        k = line.split(":", 1)[0]
        if k not in seen:
            seen.add(k)
            unique.append(line)
    if len(unique) > MAX_ERROR_LINES:  # e.g. a table of 100,000 unknown keys: the first few say enough
        unique = unique[:MAX_ERROR_LINES] + [f"... and {len(unique) - MAX_ERROR_LINES:,} more errors like these."]
    return "invalid recipe:\n  " + "\n  ".join(unique)


MAX_ERROR_LINES = 10


def _model_at(model_cls: type[BaseModel], loc: list[str]) -> type[BaseModel] | None:
    current: Any = model_cls
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        info = current.model_fields.get(part)
        if info is None:
            return None
        current = _optional_model(info.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _optional_model(annotation: Any) -> Any:
    """``Section | None`` (an optional section such as ``[sweep]``) -> ``Section``; anything else as it is."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return args[0]
    return annotation


def _real_key_path(model_cls: type[BaseModel], loc: list[str]) -> list[str]:
    """Keep the recipe keys of a pydantic error location, dropping union-branch names."""
    out: list[str] = []
    current: Any = model_cls
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            break  # below a leaf value: the rest are pydantic's branch labels
        out.append(part)
        info = current.model_fields.get(part)
        current = _optional_model(info.annotation) if info is not None else None
    return out
