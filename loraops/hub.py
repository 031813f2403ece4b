"""The Hugging Face Hub: pull adapters, push them with a model card, read a base model's manifest remotely.

Everything goes through ``huggingface_hub`` (its cache, its auth, its offline mode); this module decides *which*
files to move and turns its exceptions into one-line loraops errors.

Environment, read at call time (so a process can change it between calls, as the tests do):
  HF_ENDPOINT       the Hub (or a mirror / self-hosted endpoint); HF_HOME / HF_HUB_CACHE the download cache;
  HF_TOKEN          a token (else the one saved by ``hf auth login``; a ``token`` argument wins over both);
  HF_HUB_OFFLINE=1  resolve revisions and files from the cache only.

Xet: huggingface_hub >= 1 uploads large files through the Xet protocol whenever ``hf_xet`` is installed, and has no
fallback when the endpoint does not speak Xet (huggingface_hub issue #4507): uploads to mirrors and self-hosted Hubs
fail. It reads ``HF_HUB_DISABLE_XET`` once, when it is imported, so this module sets it (unless the user did) before
anything imports huggingface_hub: uploads then use the LFS protocol every Hub endpoint speaks (huggingface.co
included). Set HF_HUB_DISABLE_XET=0 to keep Xet.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import math
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from . import blocks
from .adapter import DORA_NOTE, LORA_BIAS_NOTE, METHOD_NAMES, METHOD_NOTES, PRODUCT_NAMES, PRODUCT_NOTES, token_rows_phrase
from .basemodel import INDEX_SUFFIX, PICKLE_SUFFIXES, PIPELINE_INDEX
from .errors import (AmbiguousError, DiskSpaceError, FormatError, HubError, InvalidInputError, LoraopsError,
                     NotFoundError, RegistryError, reworded)
from .fsutil import path_exists, read_json, read_model_config, resolved
from .landing import registered, tell, watched
from .references import argument, flags_checked
from .lazy import LazyModule
from .st import DTYPE_BYTES, MAX_HEADER_BYTES, parse_header, tensor_dtype_shape

if TYPE_CHECKING:
    from . import records
    from .registry import store
else:  # what pull's and push's annotations name resolves when they are read: lazy.py
    records, store = LazyModule("loraops.records"), LazyModule("loraops.registry.store")

XET_ENV = "HF_HUB_DISABLE_XET"
XET_SET_BY_USER = XET_ENV in os.environ
os.environ.setdefault(XET_ENV, "1")

DEFAULT_ENDPOINT = "https://huggingface.co"
SOURCE_PREFIX = "hf://"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
CARD = "README.md"
PEFT_FILES = (ADAPTER_CONFIG, PEFT_WEIGHTS)
"""--file naming either stands for the folder that holds both (`--file lora/adapter_config.json` was refused as "not
a .safetensors file")."""
# What pull takes first at a repo's root (select_adapter_files): a push of another layout removes them, or pulling
# the pushed commit back would give the adapter they hold
CANONICAL_ADAPTER_FILES = (ADAPTER_CONFIG, PEFT_WEIGHTS, "adapter_model.bin")
OTHER_WEIGHT_SUFFIXES = PICKLE_SUFFIXES + (".h5", ".msgpack", ".onnx", ".gguf", ".safetensors")

_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.\-]{0,95}/)?[A-Za-z0-9][\w.\-]{0,95}$")
_SHA = re.compile(r"^[0-9a-f]{40}$")
_SHA_PREFIX = re.compile(r"^[0-9a-fA-F]{4,39}$")  # git's shortest abbreviation is 4
_PR_REF = re.compile(r"^refs/pr/([1-9][0-9]*)$")
_BEARER = re.compile(r"Bearer[^'\"]*")
_SOURCE_PATH = re.compile(r"^([0-9a-f]{40})/(.*)$")  # hub_source's commit and path
_PAGE = re.compile(r"^([^/@]+/[^/@]+)/(?:tree|blob|resolve)/([^/]+)(?:/(.*))?$")  # a Hub page: owner/name/tree/REV/…


# ---- references ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RepoRef:
    """``owner/name[@revision]``: revision is a branch, tag, ``refs/pr/N`` or commit sha; None = default branch."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id


def parse_repo_ref(text: str) -> RepoRef:
    """Parse ``owner/name``, ``owner/name@rev``, also with a ``hub:`` / ``hf://`` prefix or a Hub URL; one that
    names a path in the repo (parse_repo_path) is refused."""
    ref, path = parse_repo_path(text)
    if path:
        raise InvalidInputError(f"{text!r} names {path} in the repo: give the repo alone (owner/name[@revision])")
    return ref


def parse_repo_path(text: str) -> tuple[RepoRef, str | None]:
    """parse_repo_ref of a reference that may also name a file or folder in the repo, in the forms a user copies:
    the source a pull records (HfFileSystem's ``hf://owner/name@<commit sha>/path``, which `show` prints) and a Hub
    page's URL (``https://huggingface.co/owner/name/tree|blob|resolve/<revision>[/path]``, the revision
    URL-encoded). Returns (RepoRef, the path or None). Both were refused: the first as "revision not found", the
    second as "not a Hub repo id"."""
    from urllib.parse import unquote

    ref, path = text.strip(), None
    for prefix in ("hub:", "hf://", "https://huggingface.co/", "http://huggingface.co/"):
        if ref.startswith(prefix):
            ref = ref[len(prefix):]
            if prefix.startswith("http"):
                ref = ref.split("?")[0].split("#")[0]
            if prefix != "hub:" and "/" in ref.removesuffix("/"):  # (ends a copied URL or hf:// folder path)
                ref = ref.removesuffix("/")
            if prefix.startswith("http"):
                page = _PAGE.match(ref)
                if page:
                    ref, path = f"{page.group(1)}@{unquote(page.group(2))}", page.group(3)
    repo_part, at, rest = ref.partition("@")
    pinned = _SOURCE_PATH.match(rest) if at and path is None else None
    if pinned:  # (only after a full sha: a branch's name may hold '/', so `@dev/x` stays the branch dev/x)
        ref, path = f"{repo_part}@{pinned.group(1)}", pinned.group(2)
    return _parse_repo_id(text, ref), (path.strip("/") or None) if path else None


def _parse_repo_id(text: str, ref: str) -> RepoRef:
    repo_id, sep, revision = ref.partition("@")
    kind = {"datasets": "dataset", "spaces": "Space"}.get(repo_id.split("/")[0]) if repo_id.count("/") == 2 else None
    if kind:
        raise InvalidInputError(f"{text!r} is a {kind} repo: loraops reads model repos (owner/name[@revision])")
    if repo_id.startswith("/") or repo_id.endswith("/"):  # `someone/` was read as the bare name someone
        raise InvalidInputError(f"{text!r} is not a Hub repo id: a '/' begins or ends it (expected "
                                "owner/name[@revision])")
    if not _REPO_ID.match(repo_id) or ".." in repo_id or "--" in repo_id or repo_id.endswith((".", ".git")):
        raise InvalidInputError(f"{text!r} is not a Hub repo id (expected owner/name[@revision])")
    if sep and not good_revision(revision):
        raise InvalidInputError(f"{text!r}: empty or invalid revision after '@'")
    return RepoRef(repo_id, revision or None)


REF_NAME_RULES = ("git's rules for a ref name: not empty; no blank, control character, ~ ^ : ? * [ \\, '..', '@{' "
                  "or '//'; no '/' or '-' first, no '/' or '.' last; no part beginning with '.' or ending in '.lock'")
_NOT_IN_REF_NAMES = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//")


def good_revision(revision: str) -> bool:
    """Could this name a branch, tag or commit: REF_NAME_RULES (`git check-ref-format --branch`; the Hub answers a
    name git refuses with a 400, after create_repo made the repo). Its Hub cache ref, refs/<revision>, stays inside
    refs/."""
    return (isinstance(revision, str) and bool(revision) and not _NOT_IN_REF_NAMES.search(revision)
            and revision != "@" and not revision.startswith(("/", "-")) and not revision.endswith(("/", "."))
            and not any(part.startswith(".") or part.endswith(".lock") for part in revision.split("/")))


def hub_source(repo_id: str, commit: str, path: str = "") -> str:
    """The registry's ``source`` for something that came from the Hub: ``hf://owner/name@<commit sha>``, followed
    by ``/<path in the repo>`` when it is not the repo's top level (huggingface_hub's HfFileSystem form)."""
    return f"{SOURCE_PREFIX}{repo_id}@{commit}" + (f"/{path}" if path else "")


def pulled_name(repo_id: str, path: str = "", *, chosen: bool = False) -> str:
    """The name a pull registers an adapter under without --name: the repo's name for the repo's own adapter (its
    top-level PEFT folder, or the lone .safetensors file pull picks there), else the repo's name followed by the
    adapter's path in the repo as hub_source writes it, without .safetensors (a PEFT file stands for its folder; each
    part cleaned as a file's default name is): someone/loras's `loras/a` and `style.safetensors` are `loras/loras/a`
    and `loras/style`, two adapters, not two versions of `loras`. ``chosen``: the path was named (--file, a path in
    the reference), not picked by pull."""
    from .registry.store import name_part

    where = PurePosixPath(path.strip("/"))
    if where.name in PEFT_FILES:
        where = where.parent
    parts = list(where.parts)
    if parts == [where.name] and where.suffix == ".safetensors" and not chosen:
        parts = []
    if parts:
        parts[-1] = parts[-1].removesuffix(".safetensors")
    return "/".join([repo_id.split("/")[-1], *map(name_part, parts)])


def parse_hub_source(source: str | None) -> RepoRef | None:
    """The RepoRef (revision = commit; the path in the repo left out) of a source written by hub_source, else None."""
    if not source or not source.startswith(SOURCE_PREFIX):
        return None
    repo, at, rest = source.partition("@")
    return parse_repo_ref(f"{repo}@{rest.split('/')[0]}" if at else repo)


def pull_again(source: str | None) -> str | None:
    """The `loraops pull` that downloads again what a pull recorded as ``source`` (hub_source: the repo at its commit,
    and the path in it as --file), which repairs a damaged stored copy; None for a source not from the Hub."""
    ref = parse_hub_source(source)
    if ref is None:
        return None
    path = source.partition("@")[2].partition("/")[2]
    return f"loraops pull {ref}" + (f" --file {shlex.quote(path)}" if path else "")  # (runs as shown in a shell)


def pull_request(revision: str | None) -> int | None:
    """N of a pull request's ref ``refs/pr/N``, else None."""
    found = _PR_REF.match(revision or "")
    return int(found.group(1)) if found else None


def _not_a_pull_request(revision: str) -> str:
    """Why a revision under refs/ that pull_request does not read is refused as a push target."""
    digits = revision.removeprefix("refs/pr/")
    if revision.startswith("refs/pr/") and digits.isdigit() and digits.isascii():
        return ("is no pull request: the Hub numbers them from 1, written without leading zeros"
                + (f" (refs/pr/{int(digits)})" if int(digits) else ""))
    return ("is no branch name: the Hub keeps refs/ for its own refs (a pull request is refs/pr/N); give a branch's "
            "plain name")


def is_commit_sha(revision: str | None) -> bool:
    return bool(revision and _SHA.match(revision))


def is_commit_prefix(revision: str | None) -> bool:
    """A revision that may abbreviate a commit sha: 4 to 39 hex digits, in either case (as git reads one)."""
    return bool(revision and _SHA_PREFIX.match(revision))


def cached_ref(ref: RepoRef) -> str | None:
    """The commit the Hub cache recorded for ``ref``'s revision as a name — a branch or tag resolved here before (by a
    pull, a download, a base add: refs/<revision>, as huggingface_hub reads it offline) — else None. This name is read
    before a commit prefix, as git and the Hub read a name that could be either."""
    from huggingface_hub.file_download import repo_folder_name

    path = cache_dir() / repo_folder_name(repo_id=ref.repo_id, repo_type="model") / "refs" / (ref.revision or "main")
    if not os.path.isfile(path):  # (False, not an error, for a name no file can have: too long, a NUL in it)
        return None
    with contextlib.suppress(OSError, UnicodeDecodeError):
        return path.read_text().strip()
    return ""  # (a ref that cannot be read names no commit, and still a branch or tag)


# ---- environment ---------------------------------------------------------------------------------------------


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def cache_dir() -> Path:
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    hf_home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(hf_home).expanduser() / "hub"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", os.environ.get("TRANSFORMERS_OFFLINE", "")).upper() in ("1", "ON", "YES", "TRUE")


def _api(token: str | None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint(), token=token, library_name="loraops")


@contextlib.contextmanager
def _progress() -> Iterator[None]:
    """huggingface_hub's progress bars follow loraops's switch (--quiet, not a terminal) for the call."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    from . import settings

    if settings.progress_enabled() or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


# ---- errors --------------------------------------------------------------------------------------------------


def _server_message(exc) -> str:
    """The Hub's own explanation (X-Error-Message), else the first line of the client's message."""
    response = getattr(exc, "response", None)
    message = response.headers.get("X-Error-Message") if response is not None else None
    return message.rstrip(".") if message else _first_line(exc)


def _network_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx"):  # the HTTP library of huggingface_hub 2.x / 1.x
        with contextlib.suppress(ImportError):
            errors.append(__import__(module).TransportError)
    return tuple(errors)


@contextlib.contextmanager
def hub_errors(ref: RepoRef | str, action: str) -> Iterator[None]:
    """Translate huggingface_hub / network exceptions raised while doing ``action`` on ``ref`` into one line."""
    from huggingface_hub import errors as hf

    where = endpoint()
    login = LOGIN
    try:
        yield
    except LoraopsError:
        raise
    except hf.GatedRepoError:
        raise HubError(f"{ref} is gated: accept its conditions at {where}/{_repo_id(ref)} with an account that "
                       f"has access, and {login}", ["token"]) from None
    except hf.RepositoryNotFoundError:
        raise _repo_not_found(ref, where) from None
    except hf.RevisionNotFoundError:
        raise NotFoundError(f"{ref}: revision not found (use a branch, a tag or a commit sha)") from None
    except hf.RemoteEntryNotFoundError as exc:
        raise NotFoundError(f"{ref}: file not found ({_server_message(exc)})") from None
    except (hf.LocalEntryNotFoundError, hf.RevisionResolutionError, hf.OfflineModeIsEnabled) as exc:
        if offline():
            raise _not_cached(ref, action, partly=isinstance(exc, hf.IncompleteSnapshotError)) from None
        raise HubError(_unreachable(action, ref, exc)) from None
    except hf.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 401 and _server_message(exc).startswith("Invalid credentials"):
            raise HubError(f"{where} refused the token while trying to {action} {ref}: it is invalid or expired; "
                           f"{login}", ["token"]) from None
        if status == 401:
            raise HubError(f"{where} refused to {action} {ref} without valid credentials: {login}", ["token"]) from None
        if status == 404 and "/" not in _repo_id(ref):  # an endpoint that knows no owner-less id says only "404"
            raise _repo_not_found(ref, where) from None
        if status == 403:
            raise HubError(f"{where} forbids you to {action} {ref} ({_server_message(exc)}); "
                           "use a token with write access to it") from None
        raise HubError(f"cannot {action} {ref}: the Hub answered {status}: {_server_message(exc)}") from None
    except _network_errors() as exc:
        _refuse_unfit_token(exc, action, ref)
        if "xet" in _root_cause(exc).lower():
            raise HubError(_xet_hint(action, ref)) from None
        raise HubError(_unreachable(action, ref, exc)) from None
    except hf.SafetensorsParsingError as exc:
        raise FormatError(f"{ref}: {_first_line(exc)}") from None
    except hf.FileMetadataError as exc:
        raise HubError(f"{where} does not answer like a Hugging Face Hub ({_first_line(exc)})") from None
    except OSError as exc:
        if exc.filename is None:
            raise HubError(f"cannot {action} {ref}: {_first_line(exc)} ({_root_cause(exc)})") from None
        raise _local_error(exc, action, ref) from None
    except (RuntimeError, ValueError) as exc:  # anything else the client raises: still one line
        _refuse_unfit_token(exc, action, ref)
        raise HubError(f"cannot {action} {ref}: {_first_line(exc)} ({_root_cause(exc)})") from None


def _local_error(exc: OSError, action: str, ref: RepoRef | str) -> LoraopsError:
    """A refusal of the local file system (the Hub cache, a download folder) while doing ``action``: no Hub error,
    one line naming the path."""
    path = Path(exc.filename)
    cache = cache_dir()
    in_cache = any(folder in path.parents for folder in (cache, resolved(cache)))  # (huggingface_hub resolves it)
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):  # (a file where its mkdir, or a path through it, wants a folder)
        where = f"the Hub cache ({cache}) is damaged" if in_cache else "it is in the way"
        return InvalidInputError(f"cannot {action} {ref}: {path} (or a folder above it) is a file where "
                                 f"huggingface_hub keeps a folder: {where}; move that file away and run this again")
    error = DiskSpaceError if exc.errno == errno.ENOSPC else InvalidInputError
    return error(f"cannot {action} {ref}: {path}: {exc.strerror or _first_line(exc)}"
                 + (f" (in the Hub cache, {cache})" if in_cache else ""))


LOGIN = "log in with `hf auth login`, set HF_TOKEN or pass `token`"
"""How a refusal for credentials ends (hub_errors; its error names ``token``)."""
TOKEN_FROM = "check `token`, else $HF_TOKEN, else the token saved by `hf auth login`"
"""Where the token a call used came from, in the order huggingface_hub takes it (hub_errors)."""


def _repo_not_found(ref: RepoRef | str, where: str) -> NotFoundError:
    repo_id = _repo_id(ref)
    if "/" not in repo_id:  # (the Hub's few owner-less ids are old models: an adapter's id has an owner)
        return NotFoundError(f"repository {repo_id} not found on {where}: a Hub repo id is owner/name, and "
                             f"{repo_id!r} names no owner")
    return NotFoundError(f"repository {repo_id} not found on {where} (if it is private, {LOGIN})", ["token"])


def _repo_id(ref: RepoRef | str) -> str:
    return ref.repo_id if isinstance(ref, RepoRef) else str(ref).split("@")[0]


def _refuse_unfit_token(exc: BaseException, action: str, ref: RepoRef | str) -> None:
    """Bad input where ``exc`` is the HTTP library refusing the token's Authorization header before anything was sent:
    a non-ASCII character (httpx's "'ascii' codec can't encode…"), a blank at an end or a control character ("Illegal
    header value b'Bearer <the token>'"). They were Hub or network errors (exit 7), the second printing the token."""
    while exc is not None:
        if isinstance(exc, UnicodeEncodeError) and str(exc.object).startswith("Bearer "):
            what = (f"holds {exc.object[exc.start]!r}, which an HTTP header cannot carry (a token is ASCII; one "
                    "copied as shown, cut short?)")
            break
        if "Illegal header value b'Bearer" in str(exc):
            what = "has a blank at an end or a control character, which an HTTP header cannot carry"
            break
        exc = exc.__cause__ or exc.__context__
    else:
        return
    raise InvalidInputError(f"cannot {action} {ref}: the Hub token {what}; {TOKEN_FROM}", ["token"]) from None


def _first_line(exc: BaseException) -> str:
    text = _BEARER.sub("Bearer ***", str(exc)).strip()  # (a token in a client's message is never shown)
    return text.splitlines()[0].rstrip(".") if text else type(exc).__name__


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return f"{type(exc).__name__}: {_first_line(exc)}" if str(exc).strip() else type(exc).__name__


def _unreachable(action: str, ref: RepoRef | str, exc: BaseException) -> str:
    hint = ("check the network or HF_ENDPOINT" if action.startswith("push") else
            "set HF_HUB_OFFLINE=1 to use what is already in the local cache")
    return f"cannot reach the Hub at {endpoint()} to {action} {ref} ({_root_cause(exc)}); {hint}"


def _not_cached(ref: RepoRef | str, action: str = "pull", partly: bool = False,
                lacking: str | None = None) -> NotFoundError:
    """``action`` "download" is a base's (download_base), whose weights come down on first use: it is not pulled.
    ``partly``: a snapshot that lacks files (a download that stopped midway); ``lacking`` says which, when known."""
    way = "its weights download on first use: run this once online first" if action == "download" else \
        "pull it once online first"
    where = "only partly" if partly else "not"
    detail = f" ({lacking})" if lacking else ""
    return NotFoundError(f"{ref} is {where} in the local Hub cache ({cache_dir()}) and HF_HUB_OFFLINE=1 is "
                         f"set{detail}; {way}")


def _xet_hint(action: str, ref: RepoRef | str) -> str:
    return (f"cannot {action} {ref}: {endpoint()} does not accept Xet uploads, and huggingface_hub was imported "
            f"with Xet on before loraops.hub could turn it off; set {XET_ENV}=1 in the environment")


# ---- names -----------------------------------------------------------------------------------------------------


def check_repo_names(names: list[str], ref: RepoRef | str, *, given: bool = False) -> None:
    """Refuse file names that would land outside the download folder (``..``, absolute paths, backslashes): a
    repo's listing that holds one is the Hub's problem (HubError); a name the user ``given`` is bad input."""
    for name in names:
        parts = PurePosixPath(name).parts
        if not name or name.startswith("/") or "\\" in name or ".." in parts or (parts and ":" in parts[0]):
            error = InvalidInputError if given else HubError
            raise error(f"{ref}: refusing file name {name!r}, which would escape the download folder")


def exactly(names: list[str]) -> list[str]:
    """huggingface_hub's allow_patterns that match these file names and nothing else: its patterns are fnmatch
    globs, so a name holding '[', '*' or '?' matched other files, or not itself (`style [v2].safetensors` was
    "not in the local cache" after the download)."""
    return [glob.escape(name) for name in names]


def select_adapter_files(names: list[str], ref: RepoRef | str, subpath: str | None = None) -> list[str]:
    """The files that make the adapter in a repo listing (repo-relative names): a PEFT folder (adapter_config.json +
    adapter_model.safetensors) or one .safetensors file (kohya / diffusers), plus README.md when present.
    ``subpath`` narrows the search to a folder or names the file. The names that would land outside the download
    folder are refused (check_repo_names): anywhere in the listing without ``subpath``, where the choice scans it;
    with it, only among the files picked — a bad name elsewhere in the repo blocked `pull --file` of a good one."""
    if not subpath:
        check_repo_names(names, ref)
    picked = _select(names, ref, subpath)
    check_repo_names(picked, ref)
    return picked


def _select(names: list[str], ref: RepoRef | str, subpath: str | None) -> list[str]:
    scope = (subpath or "").strip("/")
    parent = str(PurePosixPath(scope).parent) if "/" in scope else ""
    if scope in names and PurePosixPath(scope).name in PEFT_FILES:
        scope = parent  # a PEFT file goes with the other next to it
    if scope and not any(n == scope or n.startswith(f"{scope}/") for n in names):  # (said "nothing adapter-like in x/")
        raise NotFoundError(f"{ref}: no file or folder {scope} in the repo; it holds: {_shown_files(names)}")
    if scope and scope in names:
        if not scope.endswith(".safetensors"):
            raise InvalidInputError(f"{ref}: {scope} is not a .safetensors file")
        folder, picked = parent, [scope]
    else:
        folder = scope
        prefix = f"{folder}/" if folder else ""
        here = sorted(n[len(prefix):] for n in names if n.startswith(prefix) and "/" not in n[len(prefix):])
        if ADAPTER_CONFIG in here:
            if PEFT_WEIGHTS not in here:
                other = "adapter_model.bin (pickle, not read: convert it to safetensors)" \
                    if "adapter_model.bin" in here else "no adapter_model.safetensors"
                raise FormatError(f"{ref}: PEFT adapter_config.json found but {other}")
            picked = [prefix + ADAPTER_CONFIG, prefix + PEFT_WEIGHTS]
            others = [prefix + n for n in here if n.endswith(".safetensors") and n != PEFT_WEIGHTS]
            if others and not subpath:  # (taken unsaid; two bare files are refused as ambiguous)
                logging.getLogger("loraops").info(
                    f"{ref}: took the PEFT adapter {f'in {folder}/' if folder else 'at the top level'} "
                    f"(adapter_config.json + adapter_model.safetensors); {', '.join(others)} "
                    f"{'is' if len(others) == 1 else 'are'} there too: pull it with --file {others[0]}")
        else:
            weights = [prefix + n for n in here if n.endswith(".safetensors")]
            if len(weights) > 1:  # (a sharded model's, maybe, with its LoRA in a folder below)
                below = _peft_folders_below(names, prefix)
                also = f", or the PEFT adapter folder {below[0]}" if len(below) == 1 else \
                    f", or one of the PEFT adapter folders {_listed(below)}" if below else ""
                raise AmbiguousError(f"{ref}: several .safetensors files ({', '.join(weights)}); pick one with "
                                     f"`subpath`{also}", ["subpath"])
            if not weights:
                below = _peft_folders_below(names, prefix)
                if len(below) == 1:  # the only adapter there is, one level or more down
                    return _select(names, ref, below[0])
                if below:
                    where = f"in {folder}/" if folder else "at the top level"
                    raise AmbiguousError(f"{ref}: no adapter {where}, but {len(below)} PEFT adapter folders below it "
                                         f"({_listed(below)}); pick one with `subpath` FOLDER", ["subpath"])
                where = f" in {folder}/" if folder else ""
                raise NotFoundError(f"{ref}: nothing adapter-like{where} (no adapter_config.json + "
                                    f"adapter_model.safetensors, no .safetensors file); the repo holds: "
                                    f"{_shown_files(names)}")
            picked = weights
    card = f"{folder}/{CARD}" if folder else CARD
    if card in names:
        picked.append(card)
    return picked


def _shown_files(names: list[str]) -> str:
    return ", ".join(sorted(names)[:20]) + (", ..." if len(names) > 20 else "") or "no files"


def _listed(names: list[str]) -> str:
    return ", ".join(names[:10]) + (", …" if len(names) > 10 else "")


def _peft_folders_below(names: list[str], prefix: str) -> list[str]:
    """The folders under ``prefix`` (any depth) that hold a PEFT adapter: adapter_config.json + weights."""
    configs = (PurePosixPath(n) for n in names if n.startswith(prefix))
    return sorted(str(c.parent) for c in configs if c.name == ADAPTER_CONFIG and f"{c.parent}/{PEFT_WEIGHTS}" in names)


# ---- pull ------------------------------------------------------------------------------------------------------


@dataclass
class Download:
    """Adapter files fetched into the Hub cache, pinned to a commit."""

    ref: RepoRef
    commit: str
    files: list[str]
    """Repo-relative names."""
    folder: Path
    """The cache snapshot folder of that commit (files under it are links into the cache's blobs)."""

    @property
    def source(self) -> str:
        """hf://repo@commit, with the adapter's path in the repo below the top level."""
        return hub_source(self.ref.repo_id, self.commit, self.path)

    @property
    def path(self) -> str:
        """The adapter's path in the repo: its folder, or its file; "" for a PEFT folder at the top level."""
        where = self.adapter_path.relative_to(self.folder).as_posix()
        return "" if where == "." else where

    @property
    def adapter_path(self) -> Path:
        """What to read: the PEFT folder, or the single weights file."""
        weights = [f for f in self.files if f.endswith(".safetensors")]
        if any(PurePosixPath(f).name == ADAPTER_CONFIG for f in self.files):
            return (self.folder / weights[0]).parent
        return self.folder / weights[0]

    @property
    def card(self) -> Path | None:
        cards = [f for f in self.files if PurePosixPath(f).name == CARD]
        return self.folder / cards[0] if cards else None


def resolve_commit(ref: RepoRef, token: str | None = None) -> str:
    """The commit sha a ref points to now (from the cache when offline)."""
    if is_commit_sha(ref.revision):
        return ref.revision
    if offline():
        cached = _cached_commit(ref)
        if cached is not None:
            return cached
        with hub_errors(ref, "resolve"):
            return _api(token).resolve_revision(ref.repo_id, revision=ref.revision, cache_dir=cache_dir(),
                                                local_files_only=True).resolved
    # Online, the Hub answers or this fails in one line: resolve_revision falls back on the cache's ref when the Hub
    # cannot be reached, printing huggingface_hub's own "Could not reach the Hub" line (also in a program that
    # imported it with HF_HUB_OFFLINE=1 and unset it since); HF_HUB_OFFLINE=1 is what uses the cache
    # (remember_ref records the answer once what asked for it succeeded)
    with hub_errors(ref, "resolve"):
        return _api(token).repo_info(ref.repo_id, revision=ref.revision).sha


def remember_ref(ref: RepoRef, commit: str) -> None:
    """Record in the Hub cache what ``ref``'s revision resolved to (refs/<revision>, the default branch's as main),
    as resolve_revision does, for HF_HUB_OFFLINE=1 later: once a pull, a download or a base add succeeded, so
    one that failed midway leaves the commit an offline pull finds as it was. Written whole or not at all (a temp
    file renamed, as huggingface_hub writes it: a reader never sees an empty ref); best effort, as there."""
    import uuid

    from huggingface_hub.file_download import repo_folder_name

    revision = ref.revision or "main"
    if offline() or revision == commit:
        return
    path = cache_dir() / repo_folder_name(repo_id=ref.repo_id, repo_type="model") / "refs" / revision
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with contextlib.suppress(OSError):
        if not path.is_file() or path.read_text() != commit:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                tmp.write_text(commit)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)


def _picks_file(repo_id: str, commit: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    from . import settings

    return settings.home() / "cache" / "hub-picks" / repo_folder_name(repo_id=repo_id, repo_type="model") / commit


def remember_pick(repo_id: str, commit: str, asked: str, path: str) -> None:
    """Note that a pull of ``repo_id@commit`` (with --file ``asked``, "" without) took the adapter at ``path`` in
    the repo, chosen from the repo's listing; a commit's files never change, so neither does the choice. Without it,
    a pull of an adapter below the top level listed and downloaded the repo again online to find what it had pulled
    before, and offline could not find it. Best effort, as the Hub cache's refs are written (a lost note costs a
    download)."""
    if asked.strip("/") == path:
        return
    file = _picks_file(repo_id, commit)
    with contextlib.suppress(OSError, ValueError):
        picks = {**picked_paths(repo_id, commit), asked.strip("/"): path}
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.{os.getpid()}")
        tmp.write_text(json.dumps(picks))
        os.replace(tmp, file)


def picked_paths(repo_id: str, commit: str) -> dict[str, str]:
    """{--file given ("" for none): the adapter's path a pull took} for ``repo_id@commit`` (remember_pick)."""
    try:
        picks = json.loads(_picks_file(repo_id, commit).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in picks.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(picks, dict) \
        else {}


def _cached_commit(ref: RepoRef) -> str | None:
    """Offline, a commit-sha prefix: the one cached snapshot whose commit starts with it (refuse_ambiguous)."""
    found = cached_commits(ref)
    refuse_ambiguous(ref, found)
    return found[0] if found else None


def cached_commits(ref: RepoRef) -> list[str]:
    """The commits of the cached snapshots that ``ref``'s revision, a commit-sha prefix, abbreviates. Online the Hub
    resolves prefixes, but huggingface_hub's cache knows only full shas and the names it resolved (refs/), so a
    prefix the cache has a ref of (a branch or tag that looks like one) abbreviates none here."""
    from huggingface_hub.file_download import repo_folder_name

    if not is_commit_prefix(ref.revision):
        return []
    snapshots = cache_dir() / repo_folder_name(repo_id=ref.repo_id, repo_type="model") / "snapshots"
    if cached_ref(ref) is not None or not snapshots.is_dir():
        return []
    prefix = ref.revision.lower()
    return sorted(p.name for p in snapshots.iterdir() if is_commit_sha(p.name) and p.name.startswith(prefix))


def refuse_ambiguous(ref: RepoRef, commits: list[str]) -> None:
    """A commit prefix is refused where it abbreviates several known ``commits`` (as git refuses one)."""
    if len(commits) > 1:
        raise AmbiguousError(f"{ref}: {len(commits)} cached commits start with {ref.revision} "
                             f"({', '.join(c[:12] for c in commits[:5])}{', …' if len(commits) > 5 else ''}); "
                             "give more of the sha")


def repo_and_path(ref: RepoRef | str, subpath: str | None) -> tuple[RepoRef, str | None]:
    """The repo and the adapter's path in it (``subpath``, --file) of a reference that may name that path itself
    (parse_repo_path); one that names another path than ``subpath`` is refused."""
    argument(subpath, "subpath", str, type(None))
    if subpath is not None and not subpath.strip("/"):  # `--file ""` was read as none, and the Hub asked
        raise InvalidInputError(f"`subpath` {subpath!r} names no file or folder in the repo; leave it out for the "
                                "adapter at the repo's top level", ["subpath"])
    if isinstance(argument(ref, "ref", str, RepoRef), RepoRef):
        return ref, subpath
    try:
        parsed, path = parse_repo_path(ref)
    except InvalidInputError as exc:
        raise InvalidInputError(f"{exc}{_no_repo_hint(ref)}") from None
    if path and subpath and path != subpath.strip("/"):
        raise InvalidInputError(f"{ref!r} names {path} in the repo, and `subpath` {subpath} another path: give one",
                                ["subpath"])
    return parsed, subpath or path


def _no_repo_hint(ref: str) -> str:
    """What a pull of something that is no repo id meant: a local adapter (register it), or a file in a repo (the
    path a user copies from a page's title, owner/name/file)."""
    if path_exists(ref):
        return f"; {ref} is here on disk: `loraops register {shlex.quote(ref)}` records it"
    owner, _, rest = ref.partition("/")
    name, _, inside = rest.partition("/")
    if inside and "@" not in ref and _REPO_ID.match(f"{owner}/{name}"):
        return f"; a file or folder in a repo is given with --file: `loraops pull {owner}/{name} --file {inside}`"
    return ""


def with_revision(ref: RepoRef, revision: str) -> RepoRef:
    """``ref`` at ``revision`` (pull --revision); a reference that names another revision is refused."""
    if not good_revision(revision):
        raise InvalidInputError(f"`revision` {revision!r} is no branch, tag or commit ({REF_NAME_RULES}); leave it out "
                                "for the default branch", ["revision"])
    if ref.revision is not None and ref.revision != revision:
        raise InvalidInputError(f"{ref} names revision {ref.revision}, and `revision` {revision} another: give one",
                                ["revision"])
    return RepoRef(ref.repo_id, revision)


def download_adapter(ref: RepoRef | str, *, token: str | None = None, subpath: str | None = None,
                     into: Path | None = None) -> Download:
    """Fetch the adapter files of ``ref`` (see select_adapter_files) into the Hub cache, at the commit its revision
    points to now; ``into``: into that empty folder instead (huggingface_hub's local_dir, its bookkeeping in
    ``into/.cache``), leaving no copy in the Hub cache. Offline (HF_HUB_OFFLINE=1) they come from the cache."""
    from huggingface_hub import ResolvedRevision, snapshot_download

    ref, subpath = repo_and_path(ref, subpath)
    if subpath:
        check_repo_names([subpath.rstrip("/")], ref, given=True)  # before anything is asked or cached
    commit = resolve_commit(ref, token)
    revision = ResolvedRevision(resolved=commit, initial=ref.revision, repo_id=ref.repo_id)
    with hub_errors(ref, "pull"), _progress():
        if offline():
            names = _cached_names(ref, commit)
            files = _snapshot_adapter_files(ref, commit, subpath) if names is None else \
                select_adapter_files(names, ref, subpath)
        else:
            api = _api(token)
            names = [s.rfilename for s in api.model_info(ref.repo_id, revision=commit).siblings or []]
            files = select_adapter_files(names, ref, subpath)
            _refuse_remote_non_adapter(ref, commit, files, names, token)
        where = {"local_dir": into} if into is not None and not offline() else {"cache_dir": cache_dir()}
        folder = Path(snapshot_download(ref.repo_id, revision=revision, token=token, endpoint=endpoint(),
                                        allow_patterns=exactly(files), local_files_only=offline(), **where))
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise NotFoundError(f"{ref}: {', '.join(missing)} not in the local cache ({folder})")
    if into is None:  # (into a folder of pull's: pull records it once registered)
        remember_ref(ref, commit)
    return Download(ref, commit, files, folder)


def _refuse_remote_non_adapter(ref: RepoRef, commit: str, files: list[str], names: list[str],
                               token: str | None) -> None:
    """A lone .safetensors picked (no PEFT config beside it: kohya, diffusers — or a model's weights) is judged by its
    header on the Hub (HTTP ranges: remote_header), as the file itself would be once downloaded
    (formats.layout_of_keys), before it is downloaded: a base model's repo came down whole, gigabytes, only to be
    refused as no adapter. A header the client cannot parse (or an empty file) is left to the download, whose reader
    says exactly what is wrong with it. Refused, it names the PEFT adapters in folders below it in the listing
    ``names`` (a fine-tune's repo with its LoRA in a subfolder), which --file picks."""
    from . import formats

    if any(PurePosixPath(f).name == ADAPTER_CONFIG for f in files):
        return
    name = next(f for f in files if f.endswith(".safetensors"))
    try:
        tensors = remote_header(ref, name, commit, token)
    except FormatError:
        return
    base_hint = f"`loraops base add hub:{ref}` records it as a base (nothing was downloaded)"
    folder = str(PurePosixPath(name).parent)
    below = _peft_folders_below(names, "" if folder == "." else f"{folder}/")
    if len(below) == 1:
        hint = (f"; the PEFT adapter in {below[0]}/ is pulled with `loraops pull {ref} --file {below[0]}`; if "
                f"{PurePosixPath(name).name} is a model, {base_hint}")
    elif below:
        hint = (f"; {len(below)} PEFT adapter folders are below it ({_listed(below)}): pick one with `loraops pull "
                f"{ref} --file FOLDER`; if {PurePosixPath(name).name} is a model, {base_hint}")
    else:
        hint = f"; if it is a model, {base_hint}"
    formats.layout_of_keys(f"{ref}/{name}", list(tensors), hint=hint)


HEADER_PROBE = 100_000
"""The bytes a safetensors header is first read with over HTTP, as huggingface_hub does: most headers fit in it."""


def remote_header(ref: RepoRef, name: str, commit: str, token: str | None) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor: (dtype, shape)} from the safetensors header of the repo file ``name`` at ``commit``, read with HTTP
    ranges (the weights are not downloaded). huggingface_hub's parse_safetensors_file_metadata reads whole answers:
    an endpoint that ignores ranges (some mirrors, plain file servers: 200 and the whole file) sent it a model's
    gigabytes to read its header. Here the answer is streamed and closed once the header is in. A file with no
    safetensors header (too short, a pickle, an empty file's 416) is a FormatError naming it."""
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(ref.repo_id, name, revision=commit, endpoint=endpoint())
    asked = build_hf_headers(token=token, library_name="loraops")
    where = f"{ref}/{name}"

    def read(start: int, stop: int) -> bytes:
        """Bytes [start, stop) of the file (fewer at its end), asked as a range; a 200 answer is the whole file."""
        with get_session().stream("GET", url, headers={**asked, "Range": f"bytes={start}-{stop - 1}"},
                                  timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
            if response.status_code == 416:  # no byte at start: an empty file
                return b""
            if response.status_code >= 400:
                response.read()
                hf_raise_for_status(response)
            skip = 0 if response.status_code == 206 else start
            data = bytearray()
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) >= skip + stop - start:
                    break
        return bytes(data[skip:skip + stop - start])

    head = read(0, HEADER_PROBE)
    length = int.from_bytes(head[:8], "little")
    if len(head) < 8 or length > MAX_HEADER_BYTES:
        raise FormatError(f"{where}: not a safetensors file (no header of a readable size)")
    if len(head) < 8 + length:
        head += read(len(head), 8 + length)
    if len(head) < 8 + length:
        raise FormatError(f"{where}: truncated or not a safetensors file (header of {length} bytes, file of "
                          f"{len(head)})")
    header = parse_header(head[8:8 + length], where)
    header.pop("__metadata__", None)
    return {tensor: tensor_dtype_shape(where, tensor, entry) for tensor, entry in header.items()}


def _snapshot_adapter_files(ref: RepoRef, commit: str, subpath: str | None) -> list[str]:
    """Offline, without the repo listing huggingface_hub caches with snapshot_download (files fetched one by one with
    hf_hub_download, as PEFT's from_pretrained does: adapter_config.json, then adapter_model.safetensors): the
    adapter files in the cache snapshot of ``commit`` where they alone decide what select_adapter_files takes online,
    whatever else the repo holds — the file ``subpath`` names, or a complete PEFT adapter in the folder it names (the
    top level without it), which is taken first. README.md beside it only when it is there (pull reads no card).
    Else a refusal that says what the snapshot lacks."""
    from huggingface_hub.file_download import repo_folder_name

    snapshot = cache_dir() / repo_folder_name(repo_id=ref.repo_id, repo_type="model") / "snapshots" / commit
    names = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()) \
        if snapshot.is_dir() else []
    scope = (subpath or "").strip("/")
    if scope in names and PurePosixPath(scope).name not in PEFT_FILES:
        return select_adapter_files(names, ref, scope)
    # a PEFT file: its folder, as _select takes it (`--file .` is no folder of the listing there, so not here)
    folder = (str(PurePosixPath(scope).parent) if "/" in scope else "") if scope in names else scope
    prefix = f"{folder}/" if folder else ""
    peft = [prefix + ADAPTER_CONFIG, prefix + PEFT_WEIGHTS]
    if all(n in names for n in peft):
        return select_adapter_files(names, ref, prefix.rstrip("/") or None)
    if not names:
        raise _not_cached(ref)
    have = [n for n in peft if n in names]
    lacking = f"has {have[0]} but no {next(n for n in peft if n not in names)}" if have else \
        f"has no {peft[0]} or {peft[1]}"
    below = _peft_folders_below(names, prefix) if not have else []
    hint = f"; the PEFT adapter in {below[0]}/ is pulled with --file {below[0]}" if len(below) == 1 else \
        f"; PEFT adapters are in {_listed(below)}: pick one with --file FOLDER" if below else ""
    raise _not_cached(ref, partly=True, lacking=f"its snapshot of commit {commit[:12]} {lacking}{hint}")


def _cached_names(ref: RepoRef, commit: str) -> list[str] | None:
    """The repo listing at ``commit`` as huggingface_hub cached it with a download (offline); None without one."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        return [f.path for f in get_cached_repo_tree(ref.repo_id, revision=commit, cache_dir=cache_dir())]
    except CachedRepoTreeNotFoundError:
        return None


# ---- push ------------------------------------------------------------------------------------------------------


@dataclass
class Upload:
    repo_id: str
    revision: str
    commit: str
    commit_url: str
    pr_url: str | None = None
    changed: bool = True
    card_kept: bool = False
    """The branch's README.md was not loraops's: it was left as it is, and ``card`` not uploaded."""
    others: tuple[str, ...] = ()
    """.safetensors files the branch holds at its top level beside ``files``, left as they were."""


def upload(repo_id: str, files: dict[str, Path | bytes], *, message: str, private: bool = False,
           revision: str | None = None, create_pr: bool = False, token: str | None = None,
           remove: Iterable[str] = (), card: bytes | None = None) -> Upload:
    """One atomic commit of ``files`` (repo path → local file or bytes) to ``repo_id``, creating the repo (private if
    asked) and the branch (from main) when missing; with ``create_pr`` the commit opens a pull request instead, and
    a ``revision`` ``refs/pr/N`` adds it to that open pull request. The repo paths in ``remove`` that the branch
    holds are deleted in the same commit. ``card`` goes in as README.md unless the branch holds one that loraops did
    not write (loraops_card): a repo's own card, which a push replaced with no word (transformers' and PEFT's
    push_to_hub keep its text)."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    ref = parse_repo_ref(repo_id)
    if "/" not in ref.repo_id:  # (create_repo made it under the token's account, and the upload then failed)
        raise InvalidInputError(f"{repo_id!r} is not a Hub repo id to push to: give owner/name", ["repo_id"])
    if ref.revision:
        raise InvalidInputError(f"{repo_id}: give the branch with `revision`, not @", ["revision"])
    if revision is not None and not good_revision(revision):  # `--revision "$UNSET"` pushed to main
        raise InvalidInputError(f"{repo_id}: `revision` {revision!r} is no branch name ({REF_NAME_RULES}); leave it "
                                "out to push to main", ["revision"])
    check_repo_names(list(files), ref)
    branch = revision or "main"
    number = pull_request(branch)
    if number is None and branch.startswith("refs/"):  # no branch the Hub makes (it refused one once the repo was made)
        raise InvalidInputError(f"{repo_id}: `revision` {branch!r} {_not_a_pull_request(branch)}", ["revision"])
    if number is not None and create_pr:
        raise InvalidInputError(f"`create_pr=True` opens a new pull request, and `revision` {branch} is one already: "
                                "give one of them (`revision` refs/pr/N alone adds the commit to that pull request)",
                                ["create_pr", "revision"])
    if offline():
        raise HubError(f"cannot push to {repo_id}: HF_HUB_OFFLINE=1 is set")
    api = _api(token)
    target = RepoRef(ref.repo_id, branch)
    with hub_errors(target, "push to"), _progress():
        if number is not None:  # a pull request's ref is made by the Hub when it is opened, never as a branch
            _refuse_unless_open(api, ref.repo_id, number)
        else:
            api.create_repo(ref.repo_id, private=private, exist_ok=True)
        # create_repo leaves an existing repo's visibility as it is: --private pushed into a public repo, unsaid
        if private and not api.repo_info(ref.repo_id).private:
            raise InvalidInputError(f"`private=True`: {ref.repo_id} exists and is public: nothing pushed (a push "
                                    "keeps an existing repo's visibility); make it private on the Hub first, or leave "
                                    "out `private=True`", ["private"])
        if number is None and branch != "main":
            api.create_branch(ref.repo_id, branch=branch, exist_ok=True)
        remove = set(remove) - set(files)
        present = set(api.list_repo_files(ref.repo_id, revision=branch)) if remove or card is not None else set()
        card_kept = CARD in present and card is not None and not loraops_card(
            _read_repo_file(ref.repo_id, CARD, branch, token))
        if card is not None and not card_kept:
            files = {**files, CARD: card}
        remove -= set(files)
        others = tuple(sorted(n for n in present - remove - set(files) if "/" not in n and n.endswith(".safetensors")))
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data if isinstance(data, bytes) else str(data))
                      for name, data in files.items()]
        operations += [CommitOperationDelete(path_in_repo=name) for name in sorted(remove & present)]
        head = api.repo_info(ref.repo_id, revision=branch).sha
        hub_log = logging.getLogger("huggingface_hub")
        level = hub_log.level
        hub_log.setLevel(logging.ERROR)  # its "No files have been modified" warning: we say it in our own words
        try:
            info = api.create_commit(ref.repo_id, operations=operations, commit_message=message, revision=branch,
                                     create_pr=create_pr)
        finally:
            hub_log.setLevel(level)
    pr_url = info.pr_url or (f"{endpoint()}/{ref.repo_id}/discussions/{number}" if number is not None else None)
    return Upload(ref.repo_id, branch, info.oid, info.commit_url, pr_url, changed=info.oid != head, card_kept=card_kept,
                  others=others)


def loraops_card(text: bytes) -> bool:
    """Was this README.md written by loraops (render_card: the tag loraops in its front matter)?"""
    front = text.decode("utf-8", "replace").replace("\r\n", "\n").split("\n---", 1)[0]
    return front.startswith("---\n") and re.search(r'^- "?loraops"?\s*$', front, re.MULTILINE) is not None


def _read_repo_file(repo_id: str, name: str, revision: str, token: str | None) -> bytes:
    """The bytes of a (small) file of the repo at ``revision``, without going through the Hub cache."""
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    response = get_session().get(hf_hub_url(repo_id, name, revision=revision, endpoint=endpoint()),
                                 headers=build_hf_headers(token=token, library_name="loraops"),
                                 timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT, follow_redirects=True)
    hf_raise_for_status(response)
    return response.content


def _refuse_unless_open(api, repo_id: str, number: int) -> None:
    """Refuse a push to pull request ``number`` unless it is open (or a draft), from its status on the Hub
    (get_discussion_details): a closed or merged one keeps its refs/pr/N until someone deletes it, and what the Hub
    answers to a commit there is not documented, so loraops does not find out by pushing. No repo is made (public,
    by default) only to find it has no such pull request."""
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    try:
        thread = api.get_discussion_details(repo_id, number)
    except RepositoryNotFoundError:
        raise
    except HfHubHTTPError as exc:
        if exc.response is None or exc.response.status_code != 404:
            raise
        thread = None
    if thread is None or not thread.is_pull_request:
        what = f"has no pull request {number}" if thread is None else f"#{number} is a discussion, not a pull request"
        raise NotFoundError(f"{repo_id} {what}: open one with `create_pr=True` (refs/pr/N pushes to an open one)",
                            ["create_pr"])
    if thread.status in ("closed", "merged"):
        again = "reopen it on the Hub or " if thread.status == "closed" else ""
        raise InvalidInputError(f"{repo_id} pull request {number} is {thread.status}: nothing pushed; {again}open "
                                "another with `create_pr=True`", ["create_pr"])


# ---- model card ------------------------------------------------------------------------------------------------


@dataclass
class CardInput:
    name: str
    weight: float
    source: str | None = None
    """Where that input came from (repo@sha, sha256, ...), when known."""


@dataclass
class CardInfo:
    """What a card says about an adapter; `lineage` only for derived adapters."""

    name: str
    format: str
    ranks: dict[str, int | None]
    alphas: dict[str, float]
    base_model: str | None = None
    """A Hub repo id (front matter) or a free description (body only)."""
    method: str | None = None
    inputs: list[CardInput] = field(default_factory=list)
    params: dict = field(default_factory=dict)
    sha256: str | None = None
    dora: bool = False
    """A DoRA adapter (a magnitude per output channel besides B and A)."""
    tokens: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """PEFT trainable tokens: tensor → the rows the adapter replaces."""
    products: list[str] = field(default_factory=list)
    """LoHa/LoKr: the kinds of its modules whose ΔW is a Hadamard or Kronecker product (no LoRA B·A)."""
    methods: list[str] = field(default_factory=list)
    """AdaLoRA/VeRA: the PEFT methods its modules come from (a PEFT LoRA loader would not load those files)."""
    lora_bias: bool = False
    """PEFT lora_bias: its lora_B factors have a bias, which a merge adds to the layers' biases."""


def _yaml_value(value) -> str:
    return json.dumps(value)  # a JSON scalar or flow list is valid YAML, with every character quoted safely


def render_card(card: CardInfo) -> str:
    """README.md with Hub front matter (library_name peft for PEFT files, base_model + relation when the base is a
    Hub repo, tags) and a body with the ranks, alphas, target modules and, for derived adapters, the lineage."""
    base_repo = card.base_model if card.base_model and _REPO_ID.match(card.base_model) else None
    front = []
    if card.format == "peft":
        front.append("library_name: peft")
    if base_repo:
        front += [f"base_model: {_yaml_value(base_repo)}", "base_model_relation: adapter"]
    tags = ["lora", "loraops"] + ([card.format] if card.format != "peft" else []) + (["dora"] if card.dora else []) \
        + (["trainable-tokens"] if card.tokens else []) + card.products + card.methods
    front.append("tags:" + "".join(f"\n- {_yaml_value(t)}" for t in tags))
    lines = ["---", *front, "---", "", f"# {card.name}", ""]
    # a LoHa/LoKr card said "LoRA": a reader would merge it as W + s·B·A
    what = " and ".join([*(PRODUCT_NAMES[p] for p in card.products), *(METHOD_NAMES[m] for m in card.methods)]) or "LoRA"
    kind = {"peft": f"A PEFT {what} adapter", "kohya": f"A kohya / sd-scripts {what}"}.get(card.format,
                                                                                        f"A {card.format} {what}")
    lines.append(f"{kind}{f' for `{card.base_model}`' if card.base_model else ''}, published with loraops.")
    lines += ["", "| | |", "|---|---|", f"| modules | {len(card.ranks)} |", f"| rank | {_spread(card.ranks.values())} |",
              f"| alpha | {_spread(card.alphas.values())} |", f"| target modules | {', '.join(_targets(card.ranks))} |"]
    if card.dora:
        lines.append(f"| variant | {DORA_NOTE} |")
    if card.lora_bias:
        lines.append(f"| variant | {LORA_BIAS_NOTE} |")
    lines += [f"| variant | {PRODUCT_NOTES[p]} |" for p in card.products]
    lines += [f"| variant | {METHOD_NOTES[m]} |" for m in card.methods]
    lines += [f"| trainable tokens | {token_rows_phrase(f'`{name}`', indices)} |" for name, indices in card.tokens.items()]
    if card.sha256:
        lines.append(f"| sha256 | `{card.sha256}` |")
    if card.method:
        params = dict(card.params)
        # combine's block weights, one list (or null) per input, shown beside each input rather than as a repr
        weighed = params.pop("block_weights", None)
        if not (isinstance(weighed, list) and len(weighed) == len(card.inputs)):
            params, weighed = card.params, None
        lines += ["", "## Lineage", "", f"Made with `loraops` by **{card.method}** of:", "",
                  "| input | weight | source |" + (" block weights |" if weighed else ""),
                  "|---|---|---|" + ("---|" if weighed else "")]
        lines += [f"| {i.name} | {i.weight:g} | {i.source or ''} |"
                  + (f" {blocks.spelled(w) if w is not None else '-'} |" if weighed else "")
                  for i, w in zip(card.inputs, weighed or [None] * len(card.inputs), strict=True)]
        if params:
            lines += ["", "Parameters: " + ", ".join(f"`{k}={v}`" for k, v in sorted(params.items()))]
    return "\n".join(lines) + "\n"


def _spread(values) -> str:
    values = sorted(set(values) - {None})  # (None: a LoKr module stored whole has no rank)
    if not values:
        return "-"
    fmt = lambda v: f"{v:g}" if isinstance(v, float) else str(v)  # noqa: E731
    return fmt(values[0]) if len(values) == 1 else f"{fmt(values[0])}–{fmt(values[-1])} (per module)"


def _targets(modules) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name in modules})


# ---- base models ------------------------------------------------------------------------------------------------


@dataclass
class RemoteTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    """Repo-relative file holding it."""


@dataclass
class RemoteBase:
    """A base model's tensor manifest read from the safetensors headers on the Hub (HTTP ranges, no weights)."""

    ref: RepoRef
    commit: str
    weight_files: list[str]
    other_files: list[str]
    tensors: dict[str, RemoteTensor]

    @property
    def source(self) -> str:
        return hub_source(self.ref.repo_id, self.commit)


def weight_layout(names: list[str], read_index, download: str = "hf download REPO",
                  read_header=None) -> tuple[list[str], dict[str, str], list[str]]:
    """Which files hold a base's weights, by the rules of loraops.basemodel, on a repo listing: a diffusers
    pipeline (model_index.json) has one part per component folder (tensor prefix '<component>.'); in a folder, the
    files basemodel.folder_weights chooses (what from_pretrained reads by default), through their index where they
    have one (or the file config.json's transformers_weights names). ``read_index(name)`` returns an index's (or the
    config's) JSON. ``download``: the command that downloads the repo, for the refusal of a folder of several
    variants (a Hub reference names no file: the hint leaves out all variants but one). Returns (files, {file:
    tensor-name prefix}, the indexes read: for base_reads, as one may lie in a subfolder away from its shards).
    A shard of an index's set that it does not list is refused, as basemodel refuses it, but where
    ``read_header(name)`` (the tensor names of a repo file) says the index lists all its tensors in other shards."""
    from .basemodel import diffusers_subfolder_shard, folder_weights, is_component, listed_shards, unlisted_shards

    def names_in(folder: str) -> list[str]:
        prefix = "" if folder in ("", ".") else f"{folder}/"
        return sorted(n[len(prefix):] for n in names if n.startswith(prefix) and "/" not in n[len(prefix):])

    def folder_files(folder: str) -> list[str]:
        prefix = f"{folder}/" if folder else ""
        here = names_in(folder)

        def give_one_variant(variants: list[str]) -> str:
            others = "".join(f" --exclude '{prefix}*.{variant}*'" for variant in variants[1:])
            return (f"a Hub reference cannot name one; download the repo without the other variants' files "
                    f"({download}{others} --local-dir DIR) and give DIR as the base")

        try:
            config = read_index(prefix + "config.json") if "config.json" in here else None
            index, files = folder_weights(here, config, give_one_variant, holds=lambda name: prefix + name in listed,
                                          shards_of=lambda name: listed_shards(read_index(prefix + name)))
        except FormatError as exc:
            raise FormatError(f"{folder}: {exc}" if folder else str(exc)) from None
        if index:
            try:
                weight_map = read_index(prefix + index)["weight_map"]
                files = sorted(set(weight_map.values()))
            except (KeyError, TypeError, AttributeError):
                raise FormatError(f"{prefix + index}: not a valid safetensors index (no weight_map)") from None
            check_repo_names([prefix + s for s in files], prefix + index)
            problem = diffusers_subfolder_shard(index, files, config)
            if problem:
                raise FormatError(f"{prefix + index}: {problem}")
            try:
                unlisted = unlisted_shards(index, weight_map, lambda sub: names_in(str(PurePosixPath(prefix, sub))),
                                           read_header and (lambda shard: read_header(prefix + shard)))
            except FormatError as exc:
                raise FormatError(f"{prefix + index}: {exc}") from None
            if unlisted:
                raise FormatError(f"{prefix + index}: does not list {', '.join(prefix + s for s in unlisted[:3])}, "
                                  "a shard of the same model")
            indexes.append(prefix + index)
        return [prefix + s for s in files]

    check_repo_names(names, "repo")
    listed, indexes = set(names), []
    if PIPELINE_INDEX in names:
        folders = [folder for folder in sorted({n.split("/")[0] for n in names if n.count("/") >= 1})
                   if is_component(names_in(folder), any(n.startswith(f"{folder}/") and n.endswith(".safetensors")
                                                         for n in names),
                                   lambda: read_index(f"{folder}/config.json"))]
        layout = {f: folder + "." for folder in folders for f in folder_files(folder)}
    else:
        layout = {f: "" for f in folder_files("")}
    if not layout:
        pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
        raise FormatError("no .safetensors weights" + (f" (only pickle files: {', '.join(pickles[:5])}; "
                                                       "loraops reads safetensors only)" if pickles else ""))
    return list(layout), layout, indexes


def base_reads(names: list[str], weights: list[str], indexes: list[str] = ()) -> list[str]:
    """The files of a repo listing that loraops.basemodel reads as a base: its ``weights`` and ``indexes``
    (weight_layout's; an index transformers_weights names may lie in a subfolder, its shards above it), and what
    says how to read them where the repo has it: a pipeline's model_index.json, and in each weights folder its
    config.json (tied heads, FP8 scales; a merged model's config) and safetensors index."""
    from .basemodel import index_of

    # and its model's folder (a pipeline's component, else the top), whose config.json may name sub/model.safetensors
    folders = ({str(PurePosixPath(w).parent) for w in weights}
               | {w.split("/")[0] if PIPELINE_INDEX in names else "." for w in weights})
    shard_indexes = {str(PurePosixPath(w).with_name(index)) for w in weights
                     if (index := index_of(PurePosixPath(w).name))}
    beside = [n for n in names if str(PurePosixPath(n).parent) in folders
              and (PurePosixPath(n).name == "config.json" or n.endswith(INDEX_SUFFIX) or n in shard_indexes)]
    return (list(weights) + sorted(set(beside) - set(weights)) + sorted(set(indexes) - set(beside))
            + ([PIPELINE_INDEX] if PIPELINE_INDEX in names else []))


def remote_base(ref: RepoRef | str, *, token: str | None = None) -> RemoteBase:
    """Read a Hub base model's manifest (names, dtypes, shapes) from its safetensors headers with HTTP range
    requests: the weights are not downloaded."""
    ref = parse_repo_ref(ref) if isinstance(ref, str) else ref
    if offline():
        raise HubError(f"cannot read the manifest of {ref} with HF_HUB_OFFLINE=1 set; add the base from a local "
                       "folder (the cache snapshot) instead")
    commit = resolve_commit(ref, token)
    api = _api(token)
    with hub_errors(ref, "read"), _progress():
        names = [s.rfilename for s in api.model_info(ref.repo_id, revision=commit).siblings or []]
        try:
            files, layout, _ = weight_layout(names, _index_reader(ref, commit, token),
                                             f"hf download {ref.repo_id} --revision {commit}",
                                             lambda name: remote_header(ref, name, commit, token))
        except FormatError as exc:
            raise FormatError(f"{ref}: {exc}") from None
        tensors: dict[str, RemoteTensor] = {}
        for name in files:
            for tensor, (dtype, shape) in remote_header(ref, name, commit, token).items():
                full = layout[name] + tensor
                if full in tensors:
                    raise FormatError(f"{ref}: tensor {tensor!r} is in both {tensors[full].file} and {name}")
                tensors[full] = RemoteTensor(full, dtype, shape, name)
    weights = set(files)
    others = [n for n in names if n not in weights and not n.endswith(OTHER_WEIGHT_SUFFIXES)]
    return RemoteBase(ref, commit, files, others, tensors)


def _index_reader(ref: RepoRef, commit: str, token: str | None):
    """weight_layout's read_index for the repo at ``commit``: a safetensors index's (or config.json's) JSON, through
    the Hub cache."""
    from huggingface_hub import hf_hub_download

    def read_index(name: str) -> dict:
        path = hf_hub_download(ref.repo_id, name, revision=commit, cache_dir=cache_dir(), token=token,
                               endpoint=endpoint(), local_files_only=offline())
        if name.endswith("config.json"):
            return read_model_config(path, name=name)
        return read_json(path, "safetensors index", name=name)

    return read_index


def add_base(registry, ref: RepoRef | str, *, name: str | None = None, token: str | None = None, told=None):
    """Record a Hub base model in the registry from its remote manifest only (source hf://repo@commit): `check`
    works at once; the weights are downloaded when something needs them (Registry.base_path). Returns (BaseRecord,
    whether it is new). ``told``: see Registry.write."""
    from .registry.store import check_name

    from . import formats

    ref = parse_repo_ref(ref) if isinstance(ref, str) else ref
    name = check_name(ref.repo_id.split("/")[-1] if name is None else name, "base")  # before reading the Hub
    base = remote_base(ref, token=token)
    if formats.key_layout(base.tensors) is not None:  # as `base add` of a local adapter says
        raise InvalidInputError(f"{ref}: this is a LoRA adapter, not a base model; pull it with `loraops pull {ref}`")
    nbytes: dict[str, int] = {}
    for t in base.tensors.values():
        nbytes[t.dtype] = nbytes.get(t.dtype, 0) + math.prod(t.shape) * DTYPE_BYTES.get(t.dtype, 0)
    added = registry.register_manifest_base(
        name=name, source=base.source,
        tensors={n: (t.dtype, t.shape) for n, t in base.tensors.items()},
        dtype=max(nbytes, key=nbytes.get), total_bytes=sum(nbytes.values()), told=told)
    remember_ref(ref, base.commit)
    return added


def download_base(ref: RepoRef | str, *, token: str | None = None) -> Path:
    """Download a Hub base model (its safetensors weights and the small files around them, no other weight
    formats) into the Hub cache, with progress; returns the snapshot folder. Offline: from the cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    ref = parse_repo_ref(ref) if isinstance(ref, str) else ref
    if offline():
        # The snapshot must hold the files loraops reads (base_reads): asked for all the repo's files, huggingface_hub
        # called it incomplete for other weight formats (.bin, .gguf) loraops never downloads, or a .gitattributes
        # `hf download --include` left out. Without the listing huggingface_hub caches with a download, the snapshot
        # is taken as it is (attach_base_files checks its tensors)
        commit = resolve_commit(ref, token)
        with hub_errors(ref, "download"):
            names, needed = _cached_names(ref, commit), None
            if names is not None:
                try:
                    # (no header read offline: its unlisted shards were held to the index when it was added)
                    weights, _, indexes = weight_layout(names, _index_reader(ref, commit, token),
                                                        read_header=lambda name: ())
                except LocalEntryNotFoundError:  # an index the listing cached with the download names
                    raise _not_cached(ref, "download", partly=True) from None
                needed = exactly(base_reads(names, weights, indexes))
            folder = Path(snapshot_download(ref.repo_id, revision=commit, cache_dir=cache_dir(),
                                            local_files_only=True, allow_patterns=needed))
        if not any(folder.rglob("*.safetensors")):  # (what base add read of it only: config.json, an index)
            raise _not_cached(ref, "download")
        return folder
    base = remote_base(ref, token=token)
    with hub_errors(ref, "download"), _progress():
        folder = Path(snapshot_download(ref.repo_id, revision=base.commit, cache_dir=cache_dir(), token=token,
                                        endpoint=endpoint(),
                                        allow_patterns=exactly(base.weight_files + base.other_files)))
    remember_ref(ref, base.commit)
    return folder


# ---- with the registry ----------------------------------------------------------------------------------------


@watched()
def pull(registry: "store.Registry", ref: RepoRef | str, *, name: str | None = None, token: str | None = None,
         subpath: str | None = None, base: str | int | None = None,
         revision: str | None = None) -> "records.PullRecord":
    """Download an adapter from the Hub and register it with source ``hf://repo@commit`` (``revision``: as
    ``ref@revision``, huggingface_hub's ``revision=``). The same adapter
    (identity) pulled again changes nothing, but for a ``base`` it is then linked to (as Registry.register_adapter
    does); a commit with other weights becomes the next version of ``name`` (default: pulled_name, the repo's name
    for its top-level adapter, else with the adapter's path in the repo)."""
    from . import formats
    from .records import PullRecord
    from .registry.store import check_name, given

    given(registry)
    ref, subpath = repo_and_path(ref, subpath)
    if revision is not None:
        ref = with_revision(ref, revision)
    if subpath:
        check_repo_names([subpath.rstrip("/")], ref, given=True)

    def named(path: str) -> str:
        """``name``, else the default name of the adapter at ``path`` in the repo."""
        if name is not None:
            return check_name(name, "adapter")
        try:
            return check_name(pulled_name(ref.repo_id, path, chosen=bool(subpath)), "adapter")
        except InvalidInputError as exc:
            raise InvalidInputError(f"{exc}; that is the default name, the repo's and the adapter's path in it: give "
                                    "`name`", ["name"]) from None

    named(subpath or "")  # before any download (the path the repo listing picks may add to the default)
    pulled = _pulled_before(registry, ref, subpath, token)
    if pulled is not None:  # its stored copy, when intact, is the download: registered again (for --base)
        record = pulled[1]
        try:
            stored = registry.intact_path(record.id)
        except RegistryError:  # damaged: downloaded again below, which repairs it
            pulled = None
    if pulled is not None:
        commit, record, source = pulled
        where = source.partition("@")[2].partition("/")[2]
        done = registry.register_adapter(stored, name=named(where), base=base, source=record.source,
                                         told=pulled_line(ref))
        folder = where if stored.is_dir() else str(PurePosixPath(where).parent)
        files = [str(PurePosixPath(folder, f.name)) if folder not in ("", ".") else f.name
                 for f in formats.adapter_files(stored)]
    elif offline():  # not pulled by loraops, but maybe in the Hub cache (another tool's download): copied
        download = download_adapter(ref, token=token, subpath=subpath)
        commit, files = download.commit, download.files
        done = registry.register_adapter(download.adapter_path, name=named(download.path), base=base,
                                         source=download.source, told=pulled_line(ref))
    else:
        # Downloaded into a folder inside the blob store and moved into place: one copy on disk, none in the Hub
        # cache; the folder goes when this ends, however it ends (what a killed process leaves is `gc`'s)
        registry.refuse_writes()
        with registry.blobs.scratch() as scratch:
            download = download_adapter(ref, token=token, subpath=subpath, into=scratch)
            commit, files = download.commit, download.files
            try:
                done = registry.register_adapter(download.adapter_path, name=named(download.path), base=base,
                                                 source=download.source, scratch=True, told=pulled_line(ref))
            except LoraopsError as exc:  # a bad file: named as it is in the repo, not by the scratch folder it left
                raise reworded(exc, str(download.folder), str(ref)) from None
    adapter = done.record
    if pulled is None:
        remember_pick(ref.repo_id, commit, subpath or "", download.path)
        if not done.created and download.source not in (adapter.source, *adapter.tags):
            # the same adapter, pulled before from another repo or path: this source becomes a tag of its record (as
            # push tags what it pushed), so that a pull of it finds the record offline too ("not in the local Hub
            # cache … pull it once online first" of what was just pulled: it was never put in that cache)
            adapter = registry.add_tags(adapter.id, [download.source])
    remember_ref(ref, commit)
    return PullRecord(repo_id=ref.repo_id, revision=ref.revision, commit=commit, files=files,
                      new=done.created, adapter=adapter, linked=done.linked, previous_base=done.previous_base)


def pulled_line(ref: RepoRef) -> "Callable[[store.Registration], str | None]":
    """What a pull tells as its registration commits (a Ctrl-C as the download's scratch folder is cleaned up said
    "nothing was written" of it)."""
    return registered(f"{ref} was pulled and registered")


def _pulled_before(registry, ref: RepoRef, subpath: str | None, token: str | None):
    """(commit, AdapterRecord, the source it was found by) of the adapter a pull of ``ref`` took before, found by its
    recorded source or a tag of the same form (what push tags, and a pull that found the adapter registered from
    elsewhere), else None: the registry, not the Hub cache, is where pulled adapters are kept. Only when the choice
    is certain: the path ``subpath`` names, or without it the repo's top-level PEFT folder (what
    select_adapter_files takes first). Offline, a commit-sha prefix is matched against the recorded commits."""
    prefix = f"{SOURCE_PREFIX}{ref.repo_id}@"
    pulled = [(source, a) for a in registry.list_adapters(modules=False) for source in _repo_sources(a, prefix)]
    if not pulled:
        return None
    commits = {source[len(prefix):].partition("/")[0] for source, _ in pulled}
    try:
        commit = resolve_commit(ref, token)
    except NotFoundError:
        if not (offline() and ref.revision and _SHA_PREFIX.match(ref.revision)):
            raise
        found = sorted(c for c in commits if c.startswith(ref.revision.lower()))
        if len(found) > 1:
            raise AmbiguousError(f"{ref}: {len(found)} pulled commits start with {ref.revision} "
                                 f"({', '.join(c[:12] for c in found[:5])}); give more of the sha") from None
        if not found:
            raise
        commit = found[0]
    scope = (subpath or "").strip("/")
    scope = picked_paths(ref.repo_id, commit).get(scope, scope)
    wanted = {hub_source(ref.repo_id, commit, scope)}
    if PurePosixPath(scope).name in PEFT_FILES:  # a PEFT file goes with the other next to it
        parent = str(PurePosixPath(scope).parent)
        wanted.add(hub_source(ref.repo_id, commit, "" if parent == "." else parent))
    return next(((commit, a, source) for source, a in pulled if source in wanted), None)


def _repo_sources(adapter: "records.AdapterRecord", prefix: str) -> list[str]:
    """Where ``adapter`` came from or went to in one repo (``prefix``: hf://owner/name@): its source, and its tags of
    that form — a pathless one only for a PEFT adapter: it names the top-level PEFT folder, and push tags a one-file
    adapter it put at the top level so too."""
    tags = [t for t in adapter.tags if t.startswith(prefix) and ("/" in t[len(prefix):] or adapter.format == "peft")]
    return [source for source in (adapter.source, *tags) if (source or "").startswith(prefix)]


@watched()
@flags_checked
def push(registry: "store.Registry", ref: str, repo_id: str, *, fmt: str | None = None, private: bool = False,
         revision: str | None = None, create_pr: bool = False, token: str | None = None) -> "records.PushRecord":
    """Upload a registered adapter to ``repo_id`` in one commit: its files (as stored, byte for byte, unless
    ``fmt`` asks for another layout) and a README.md model card. The pushed commit is recorded on the adapter as
    a tag ``hf://repo@commit``."""
    import tempfile

    from . import formats
    from .records import PushRecord
    from .registry.store import given

    record = given(registry).get_adapter(ref)
    argument(repo_id, "repo_id", str)
    fmt = fmt or record.format
    with tempfile.TemporaryDirectory(prefix="loraops-push-") as tmp:
        if stored_as(registry, record, fmt):
            paths = formats.adapter_files(registry.intact_path(record.id))
        else:
            single_file = {"kohya": f"{record.name.split('/')[-1]}.safetensors",
                           "diffusers": formats.diffusers.WEIGHTS_NAME}
            dest = Path(tmp) / single_file.get(fmt, "adapter")
            paths = formats.adapter_files(formats.write_adapter(registry.load_adapter(record.id), dest, fmt))
        files: dict[str, Path | bytes] = {p.name: p for p in paths}
        card = render_card(card_info(registry, record, fmt)).encode()
        # an adapter already at the repo's root under the names pull looks for first would shadow this one
        try:
            done = upload(repo_id, files, message=f"Upload {record.ref} ({fmt}) with loraops", private=private,
                          revision=revision, create_pr=create_pr, token=token, remove=CANONICAL_ADAPTER_FILES,
                          card=card)
        except KeyboardInterrupt:  # ("nothing was written" is not known: the commit may have been made)
            raise KeyboardInterrupt(f"interrupted while pushing {record.ref} to {repo_id}@{revision or 'main'}, "
                                    "before the Hub confirmed a commit; push again (files the Hub already has are "
                                    "not committed twice)") from None
        # told at once: a Ctrl-C as the files written in another layout are removed said "nothing was written"
        got = f"interrupted after {done.repo_id}@{done.revision} got commit {done.commit[:12]} with {record.ref}"
        tagged = not create_pr and pull_request(done.revision) is None  # (a pull request's commit is no branch's yet)
        if done.changed:
            tell(got + (", before the registry recorded it as a tag; push again to record it (the Hub makes no "
                        "second commit)" if tagged else f" (pull request {done.pr_url})" if done.pr_url else ""))
    if done.others:  # (another adapter file there: a pull of the repo took the PEFT one unsaid, or asked which)
        took = "takes the PEFT adapter pushed now" if ADAPTER_CONFIG in files else \
            f"asks which to take (--file {next(iter(files))})"
        logging.getLogger("loraops").info(
            f"{done.repo_id}@{done.revision} also holds {', '.join(done.others)} beside what was pushed, left as it "
            f"was: `loraops pull {done.repo_id}` {took}")
    if tagged:
        remember_ref(RepoRef(done.repo_id, done.revision), done.commit)  # (an offline pull of the repo finds it)
        tag = hub_source(done.repo_id, done.commit)
        new = tag not in registry.get_adapter(record.id).tags  # (nothing pushed, the tag had: nothing landed)
        registry.add_tags(record.id, [tag])
        if done.changed or new:
            tell(f"{got}, recorded as a tag" if done.changed else
                 f"interrupted after the registry recorded {done.repo_id}@{done.commit[:12]} as a tag of {record.ref}")
    return PushRecord(ref=record.ref, repo_id=done.repo_id, revision=done.revision, format=fmt,
                      files=list(files) + ([] if done.card_kept else [CARD]), card_kept=done.card_kept,
                      commit=done.commit, commit_url=done.commit_url, pr_url=done.pr_url, changed=done.changed)


def stored_as(registry, record, fmt: str) -> bool:
    """Is the stored copy of a registered adapter in layout ``fmt``, so that push uploads it byte for byte? Not when
    its layout is read as another (an XLabs FLUX file's record says diffusers, what it is read as), nor when it was
    registered with an alpha (its identity then is not its files'), which its files do not hold."""
    from . import formats

    if fmt != record.format:
        return False
    path = registry.intact_path(record.id)  # (a damaged copy is refused as push refuses it)
    return formats.detect(path) == fmt and formats.identity(path, weights_sha256=record.weights_sha256) == record.sha256


def card_info(registry, record, fmt: str) -> CardInfo:
    """What the model card says about a registered adapter: its modules, its base (a Hub repo id when the base
    came from the Hub, else PEFT's base_model_name_or_path) and, for a derived adapter, its lineage."""
    base_model = record.base_hint
    if record.base is not None:
        hub_base = parse_hub_source(registry.get_base(record.base.id).source)
        base_model = hub_base.repo_id if hub_base else base_model or record.base.name
    if base_model and path_exists(Path(base_model).expanduser()):
        base_model = None  # a local path means nothing to the Hub's readers
    as_stored = stored_as(registry, record, fmt)
    card = CardInfo(name=record.name, format=fmt, ranks={m.name: m.rank for m in record.modules},
                    alphas={m.name: m.alpha for m in record.modules}, base_model=base_model,
                    sha256=record.weights_sha256 if as_stored else None, dora=record.dora,
                    products=list(record.products),
                    # written in another layout, an AdaLoRA/VeRA adapter is the plain LoRA it equals
                    methods=list(record.methods) if as_stored else [])
    from . import formats

    # the registry keeps no token rows nor lora_bias; the stored copy's config and header say them without reading
    # its values
    stored = formats.read_adapter(registry.adapter_path(record.id), values=False)
    card.tokens = {name: rows.indices for name, rows in stored.token_rows.items()}
    card.lora_bias = stored.lora_bias
    if record.lineage is not None:
        card.method, card.params = record.lineage.op, dict(record.lineage.params)
        card.inputs = [CardInput(i.ref, i.weight if i.weight is not None else 1.0, _input_source(registry, i))
                       for i in record.lineage.inputs]
    return card


def _input_source(registry, item) -> str | None:
    """A lineage input's public origin: its Hub source when it came from the Hub (an adapter pulled, a base added
    with hub:), else its sha256; an input removed from the registry since is said to be, with the sha256 its lineage
    keeps (its record, and the source with it, is gone)."""
    if item.id is not None:
        record = registry.get_adapter(item.id) if item.kind == "adapter" else registry.get_base(item.id)
        if parse_hub_source(record.source):
            return record.source
    sha256 = f"sha256 {item.sha256[:16]}…" if item.sha256 else None
    if item.id is None:
        return "; ".join(filter(None, ["removed from the registry", sha256]))
    return sha256
