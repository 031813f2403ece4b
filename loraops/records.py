"""Plain pydantic records: what the library returns and what `--json` prints (a documented, stable schema).

Registry rows, tensors and file handles never leave the library; these do. The names mean one thing in every record:
`adapter` is an AdapterRecord, `base` a base's record (BaseRef, BaseRecord), `ref` the reference string of an adapter
(name@version, or the path given; a lineage input's, a base's name), `base_ref`/`tuned_ref` a model's (a registered
base's name, or the path given), `created` a time, `new` whether a call added the record, and `dtype` a torch dtype
name (DtypeName). A command that registers prints the record under `adapter` (`base`) with what it did beside it.
"""
from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from .st import torch_name

DtypeName = Annotated[str, AfterValidator(torch_name)]
"""A dtype as torch names it (bfloat16, float16, float32, float8_e4m3fn), in every record: a safetensors name given
(BF16, F8_E4M3: a base's manifest, a merge's output) is turned into that here, so no --json says BF16 where another
says bfloat16."""


class Record(BaseModel):
    model_config = ConfigDict(frozen=True, defer_build=True)

    @classmethod
    def model_rebuild(cls, **options):
        """A record's schema is built when it is first made (defer_build: a command builds the few it makes), with the
        names of this module. Pydantic's deferred build takes them from the frames of whoever first makes it, and
        what it keeps of them kept that caller's locals alive: a combine's module factors, one more module held as
        the next was written (test_derive_stream, run alone)."""
        options["_types_namespace"] = options.get("_types_namespace") or globals()
        return super().model_rebuild(**options)


class ModuleRecord(Record):
    """One adapted module: `name` is its path in the base model (for an unbound kohya file, the kohya name). `kind`
    is the layer's (an AdaLoRA/VeRA module's too: the adapter's `methods` name those), or loha/lokr for those; `rank`
    is None for a LoKr whose two factors are stored whole."""

    name: str
    kind: Literal["linear", "conv", "embedding", "loha", "lokr"]
    rank: int | None
    alpha: float
    scale: float
    in_features: int
    out_features: int
    kernel: tuple[int, ...] | None = None
    """A convolution's kernel size ([3, 3], [1, 1]: whether --conv-rank or --rank ranks it): `inspect` reads it from
    the file, the registry records it (bound to the base, at registration); None for the other layers, and for a conv
    the registry could not record it for (see docs/registry.md)."""

    @classmethod
    def of(cls, module) -> "ModuleRecord":
        return cls(
            name=module.name, kind=module.shown_kind, rank=module.rank, alpha=module.alpha, scale=module.scale,
            in_features=module.in_features, out_features=module.out_features,
            kernel=module.shown_kernel,
        )


class ResizeModuleRecord(Record):
    """One module of a resize: ranks before/after and how much of its spectrum the new rank keeps."""

    name: str
    kind: Literal["linear", "conv", "embedding"]
    spatial: bool = False
    """A k×k convolution (kernel larger than 1): one of the modules a conv_rank ranks."""
    kernel: tuple[int, ...] | None = None
    """A convolution's kernel size ([3, 3], [1, 1]); None for the other layers."""
    rank_before: int
    rank_after: int
    alpha_after: float
    fro_retained: float
    """‖S_k‖/‖S‖ over the singular values S of B·A: 1 − fro_retained² is the relative squared Frobenius error."""
    sum_retained: float | None
    """ΣS_k/ΣS (kohya's 'sum(S) retained'); None when a randomized SVD (a big LoHa/LoKr module at a fixed rank) gave
    only the top singular values."""
    zero: bool = False
    """Its B·A is zero (an untrained lora_up): kept at rank 1, fro/sum retained 1, and left out of the report's means
    (kohya's resize_lora.py gets 0/0 for it and leaves it out of its average)."""


class ResizeReport(Record):
    rank: int | None
    dynamic: str | None
    param: float | None
    max_rank: int | None
    conv_rank: int | None = None
    """The k×k convolutions' rank (their cap, with a dynamic rule); None: the same rule as every module."""
    device: str
    precision: Literal["float32", "float64"]
    modules: list[ResizeModuleRecord]
    fro_retained_mean: float
    """Over the modules whose B·A is not zero (over all when every one is: 1)."""
    sum_retained_mean: float | None
    """Over the same modules, those whose sum_retained is known (None when none is)."""
    parameters_before: int
    parameters_after: int
    seconds: float


class ExtractModuleRecord(Record):
    """One weight an extract factorized: its delta D = W_tuned − W_base approximated at ``rank``."""

    name: str
    kind: Literal["linear", "conv", "embedding"]
    spatial: bool = False
    """A k×k convolution (kernel larger than 1): one of the modules a conv_rank ranks."""
    shape: list[int]
    """The weight's shape as stored."""
    rank: int
    alpha: float
    svd: Literal["exact", "randomized"]
    error: float
    """Relative Frobenius error ‖D − s·B·A‖/‖D‖ before the factors are cast to the output dtype (0 when the rank
    holds the whole delta)."""
    fro_retained: float
    """√(1 − error²): the share of ‖D‖ the factors keep."""


class ExtractSkippedRecord(Record):
    """A tensor that differs between the models but is not extracted (a norm, a bias, an embedding not asked for, a
    difference of dtype rounding alone)."""

    name: str
    reason: str
    max_abs_diff: float


class ExtractReport(Record):
    base_ref: str
    """The base model as given: a registered base's name, or the path given (``tuned_ref`` the same for the tuned
    model; the extracted adapter's record has ``base``, the record it was registered against)."""
    tuned_ref: str
    rank: int | None
    dynamic: str | None
    param: float | None
    max_rank: int | None
    conv_rank: int | None = None
    """The k×k convolutions' rank (their cap, with a dynamic rule); None: the same rule as every module."""
    alpha: float | None
    """The alpha given (None: every module's rank, so every scale is 1)."""
    device: str
    precision: Literal["float32", "float64"]
    dtype: DtypeName
    """The factors' dtype as written."""
    modules: list[ExtractModuleRecord]
    error_max: float
    error_mean: float
    fro_retained_mean: float
    identical: int
    """Tensors equal in both models (same bytes, or the same values in two dtypes)."""
    skipped: list[ExtractSkippedRecord]
    saved: list[str]
    """Tensors stored whole (--save-module: PEFT modules_to_save)."""
    rounding: list[ExtractSkippedRecord] = []
    """Tensors the two models store in other dtypes that differ only by the rounding between them (reason:
    "float32 → bfloat16", base's → tuned's, as torch names them), left out."""
    rounding_targets: list[str] = []
    """Of ``rounding``, the weights keep_rounding would extract (the others are norms, biases, embeddings not asked
    for, weights outside --modules, a checkpoint's VAE: not extracted either way)."""
    parameters: int
    seconds: float
    peak_rss_bytes: int
    peft_names: dict[str, str] = {}
    """Module (or whole tensor) name as saved → the name PEFT sees on the model transformers builds, where they
    differ: what the PEFT output is written under (see check.memory_names)."""
    warnings: list[str] = []
    """What PEFT may not load as loraops does: the model family (and so the names PEFT sees) cannot be told, or
    per-expert modules of experts transformers holds fused."""
    untied_heads: dict[str, str] = {}
    """Output heads the base ties to its input embeddings (and does not store) that the tuned model stores apart →
    those embeddings: each head's module is its change from them (what PEFT's LoRA on the tied head adds; a merge
    unties the head)."""
    base_changed: list[str] = []
    """The registered bases named (or found at the paths given) for the base or the tuned model whose files changed
    since they were registered: what was read is recorded as a base of its own (by fingerprint), as merge does."""


class CombineInputRecord(Record):
    ref: str
    weight: float
    rank: int | None
    """The input's rank (None when its modules have different ranks)."""
    modules: int
    block_weights: list[float] | None = None
    """Its Stable Diffusion block weights (--block-weights; loraops.blocks), as given; None for none or a list of 1s."""


class CombineModuleRecord(Record):
    name: str
    rank: int
    """The rank written (as resize's rank_after, extract's rank)."""
    spatial: bool = False
    """A k×k convolution (kernel larger than 1): one of the modules a conv_rank ranks."""
    inputs: int
    """How many inputs adapt this module (the others count as a zero delta)."""
    svd: Literal["none", "factored", "exact", "randomized"]
    """How the result was factored: none (cat, exact by construction), factored (exact SVD of the stacked factors),
    exact / randomized (SVD of the dense delta an element-wise method produced)."""
    error: float
    """Relative Frobenius error ‖D − B'A'‖/‖D‖ of the output factors against the method's exact result D."""
    zero: bool = False
    """The result is zero here (every entry dropped — a DARE density of 1e-30 — or the inputs cancel)."""


class CombineReport(Record):
    method: str
    params: dict
    rank: int | None = None
    """The rank asked for (--rank); None: the method's default (see CombineModuleRecord.rank for what was written)."""
    conv_rank: int | None = None
    """The k×k convolutions' rank asked for (--conv-rank); None: the same rule as every module."""
    inputs: list[CombineInputRecord]
    device: str
    precision: Literal["float32", "float64"]
    modules: list[CombineModuleRecord]
    error_max: float
    error_mean: float
    parameters: int
    seconds: float


class TensorRecord(Record):
    """One tensor of a registered base's manifest (no --json prints it)."""

    name: str
    dtype: str
    """The safetensors header's name (BF16, F8_E4M3), as the manifest compares it with the files."""
    shape: tuple[int, ...]


class BaseRef(Record):
    """The base an adapter is recorded against."""

    id: int
    name: str
    fingerprint: str


class LineageInput(Record):
    """An input of a lineage step, as given to add_adapter / add_base: a registered adapter or base by id."""

    kind: Literal["adapter", "base"]
    id: int
    weight: float | None = None
    role: str | None = None
    ref: str | None = None
    """The reference it was found by (name@version, a base's name), for messages only: an input another process
    removed meanwhile is named so, not by its id."""


class LineageSpec(Record):
    """How an artifact was produced: the operation, its parameters (JSON-able), and its inputs."""

    op: str
    params: dict[str, Any] = Field(default_factory=dict)
    inputs: list[LineageInput] = Field(default_factory=list)


class LineageInputRecord(Record):
    kind: Literal["adapter", "base"]
    id: int | None
    """None once the input was removed from the registry; ref and sha256 still say what it was."""
    ref: str
    """name@version for an adapter, the name for a base (at the time of recording): the reference the input was
    registered under, which stays when it is removed."""
    sha256: str | None
    weight: float | None
    role: str | None


class LineageRecord(Record):
    id: int
    op: str
    params: dict[str, Any]
    inputs: list[LineageInputRecord]
    created: datetime


class BaseRecord(Record):
    """A registered base model (`base show --json`)."""

    id: int
    name: str
    fingerprint: str
    source: str
    path: str | None
    num_tensors: int
    num_parameters: int
    dtype: DtypeName
    """The dtype holding most of the bytes."""
    total_bytes: int
    derived: bool
    lineage: LineageRecord | None
    created: datetime


class AdapterRecord(Record):
    """A registered adapter (`show --json`; `list --json` is a list of these)."""

    id: int
    name: str
    version: int
    sha256: str
    """Identity: sha256 over the weights bytes and the config fields that change the math."""
    weights_sha256: str
    """sha256 of the weights file's bytes (what the Hub and Civitai show)."""
    format: str
    dtype: DtypeName
    size: int
    num_parameters: int
    rank: int | None
    """None when modules have different ranks."""
    alpha: float | None
    """None when modules have different alphas."""
    scale_mode: str
    target_modules: list[str]
    dora: bool = False
    """A DoRA adapter (PEFT use_dora): its modules also have a magnitude per output channel (see Adapter.dora)."""
    products: list[Literal["loha", "lokr"]] = []
    """LoHa/LoKr: the kinds of its modules whose ΔW is a Hadamard or Kronecker product (see Adapter.products)."""
    methods: list[Literal["adalora", "vera"]] = []
    """The PEFT methods (AdaLoRA, VeRA) its modules were read from as the plain LoRA each equals (Adapter.methods)."""
    token_rows: dict[str, int] | None = {}
    """PEFT trainable tokens: base tensor → how many of its rows the adapter replaces ({} for none). null: not
    recorded (a PEFT adapter registered before loraops recorded them; `loraops verify` records them)."""
    base: BaseRef | None
    base_hint: str | None
    """base_model_name_or_path as written in the adapter (PEFT), when present."""
    tags: list[str]
    source: str | None
    path: str
    """Where the adapter's stored copy is on disk (inside the blob store)."""
    created: datetime
    num_modules: int
    modules: list[ModuleRecord]
    """Every module, except in `list`'s table (``Reader.list_adapters(modules=False)``), which only counts them."""
    lineage: LineageRecord | None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


class ShapeMismatch(Record):
    """A module (or full tensor) whose base tensor has another shape; ``expected`` is the base's, None if absent."""

    name: str
    tensor: str
    expected: list[int] | None
    actual: list[int]


class CheckReport(Record):
    """How an adapter fits a base: every module matched by name and shape, or exactly what does not."""

    ok: bool
    base_ref: str | None = None
    """The base checked against: a registered base's name, or the path given (None: a manifest checked without a
    name, loraops.check.check)."""
    matched: int
    modules: int
    missing: list[str]
    """Adapter modules with no tensor in the base (for kohya names: no base module has that underscore form)."""
    why_missing: dict[str, str] = {}
    """For some missing modules, what the base stores instead (T5's encoder.embed_tokens is its shared embeddings)."""
    ambiguous: list[str] = []
    """kohya names that more than one base module turns into."""
    shape_mismatches: list[ShapeMismatch]
    full_tensor_mismatches: list[ShapeMismatch] = []
    """modules_to_save tensors missing from the base (expected null) or of another shape."""
    token_row_mismatches: list[ShapeMismatch] = []
    """Trainable tokens (PEFT) whose tensor is missing from the base (expected null), of another width, or shorter
    than their largest index (actual: [largest index + 1, width])."""
    token_rows: int = 0
    """PEFT trainable tokens: how many rows the adapter replaces, over every tensor."""
    token_rows_matched: int = 0
    """Of those, the rows of tensors that fit the base (see token_row_mismatches)."""
    tensors: int = 0
    """Whole tensors: the adapter's modules_to_save copies, and those PEFT saves whole on this base that its file lacks
    (these never fit: see why_missing)."""
    tensors_matched: int = 0
    """Of those, the ones that fit the base (see full_tensor_mismatches and missing)."""
    tied_heads: list[str] = []
    """Output heads (lm_head) the base does not store, tying them to input embeddings of their shape, that an adapter
    changes, or whose embeddings a LoRA or a modules_to_save copy changes (known when the base's config.json is at
    hand): a merge writes them untied (see loraops.engine)."""


class InspectReport(Record):
    """What `loraops inspect` reports about an adapter file or folder (no registry involved)."""

    path: str
    format: str
    identity: str
    """sha256 of the file; for a PEFT folder it also covers the math fields of the config (see formats.identity)."""
    files: list[str]
    size: int
    dtype: DtypeName
    rank: int | None
    """null when modules have different ranks."""
    alpha: float | None
    """null when modules have different alphas."""
    scale_mode: Literal["classic", "rslora"]
    target_modules: list[str]
    dora: bool = False
    """A DoRA adapter (PEFT use_dora): its modules also have a magnitude per output channel (see Adapter.dora)."""
    products: list[Literal["loha", "lokr"]] = []
    """LoHa/LoKr: the kinds of its modules whose ΔW is a Hadamard or Kronecker product (see Adapter.products)."""
    methods: list[Literal["adalora", "vera"]] = []
    """The PEFT methods (AdaLoRA, VeRA) its modules were read from as the plain LoRA each equals (Adapter.methods)."""
    lora_bias: bool = False
    """PEFT lora_bias: its lora_B factors have a bias, which a merge adds to the layers' biases (Adapter.lora_bias)."""
    num_modules: int
    num_parameters: int
    names_resolved: bool
    trainable_tokens: dict[str, list[int]] = {}
    """PEFT trainable tokens: base tensor → the token indices whose rows the adapter replaces."""
    base_model: str | None
    full_tensors: list[str]
    metadata: dict[str, str]
    modules: list[ModuleRecord]


class CheckResult(Record):
    """`check --json`: how one adapter fits one base (given or recorded) or, when it has none, every registered base."""

    ref: str
    """name@version, or the path checked."""
    fits: list[str]
    """The bases it fits (the base_ref of each report that is ok)."""
    reports: list[CheckReport]
    base_hint: str | None = None
    """base_model_name_or_path as written in the adapter (PEFT), when present (as AdapterRecord's)."""

    @classmethod
    def of(cls, adapter: str, reports: list[CheckReport], base_hint: str | None = None) -> "CheckResult":
        return cls(ref=adapter, fits=[r.base_ref for r in reports if r.ok], reports=reports, base_hint=base_hint)


class PullRecord(Record):
    """What `loraops pull` did (`pull --json`)."""

    repo_id: str
    revision: str | None
    """As asked (branch, tag, sha); None = the default branch."""
    commit: str
    files: list[str]
    """Repo files fetched (the adapter's, and README.md when present)."""
    new: bool
    """False when that adapter (same identity) was already registered: nothing changed, unless ``linked``."""
    adapter: AdapterRecord
    linked: bool = False
    """Already registered, and this pull linked it to the base asked for (--base): it had none, or previous_base."""
    previous_base: BaseRef | None = None


class PushRecord(Record):
    """What `loraops push` did (`push --json`)."""

    ref: str
    """name@version pushed."""
    repo_id: str
    revision: str
    format: str
    files: list[str]
    commit: str
    commit_url: str
    pr_url: str | None = None
    changed: bool = True
    """False when the branch already held exactly these files: the Hub made no commit (``commit`` is its head)."""
    card_kept: bool = False
    """The branch's README.md was not written by loraops: it was kept, and no model card pushed."""


class DerivedRecord(Record):
    """A combined, resized or extracted adapter: its registry record, whether it is new, where it was also written,
    and the operation's report (`combine/resize/extract --json`)."""

    adapter: AdapterRecord
    new: bool
    """False when an adapter of that identity was already registered: its record, not registered again."""
    output: str | None
    report: CombineReport | ResizeReport | ExtractReport


class ExportReport(Record):
    """What `export` wrote (`export --json`); nothing is registered."""

    ref: str
    """The adapter exported: its registry reference (name@version), or the path given."""
    format: Literal["peft", "kohya", "diffusers"]
    output: str
    plain_lora_of: list[str]
    """The PEFT methods (adalora, vera) whose modules were written as the plain LoRA they equal: another adapter, of
    another identity, which only `register` records."""
    left_out: list[str]
    """PEFT saved embedding layers left out of a kohya or diffusers file: they hold the base's values."""


class MergeInputRecord(Record):
    """One adapter of a merge or subtract: where it came from and the weight it was applied with (negated for
    subtract: the weight as it entered W' = W + Σ wᵢ·sᵢ·Bᵢ·Aᵢ)."""

    ref: str
    weight: float
    modules: int
    full_tensors: int = 0
    block_weights: list[float] | None = None
    """Its Stable Diffusion block weights (--block-weights; loraops.blocks), as given; None for none or a list of 1s."""
    component: str | None = None
    """The pipeline component it went to alone ("transformer_2", a Wan 2.2 pipeline's second transformer:
    --transformer-2); None where it was bound to the whole base."""


class ResidualRecord(Record):
    """What a subtract leaves behind. ``compared_to`` names the pristine base when one was available to compare
    against (then ``elements_differing`` / ``max_abs_diff`` are measured over the tensors the adapters touch);
    ``rounding_max_abs`` is always measured: the largest |stored − exact| introduced by the final rounding."""

    compared_to: str | None = None
    elements: int = 0
    elements_differing: int | None = None
    max_abs_diff: float | None = None
    rounding_max_abs: float = 0.0
    note: str = ""


class MergeReport(Record):
    operation: Literal["merge", "subtract", "restore"]
    output: str
    base_path: str
    """The folder (or file) of the model merged into, subtracted from, or restored from: a registered base's files,
    or the path given."""
    adapters: list[MergeInputRecord]
    dtype: DtypeName
    """Output dtype of the floating tensors."""
    device: str
    precise: bool = False
    tensors_merged: int = 0
    tensors_replaced: int = 0
    """modules_to_save tensors written in place of the base's."""
    tensors_converted: int = 0
    """Untouched floating tensors converted to a new --dtype."""
    tensors_copied: int = 0
    """Untouched tensors copied byte for byte."""
    bytes_written: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    """Peak resident memory of the whole process (getrusage), start-up included."""
    residual: ResidualRecord | None = None
    heads_untied: list[str] = []
    """Output heads written as tensors of their own, untied from the input embeddings the base ties them to (an
    adapter changes them; config.json then says tie_word_embeddings: false)."""
    files_left_out: list[str] = []
    """Other weight files of the base folder (a pytorch_model.bin, a model.safetensors beside the index's shards)
    not copied: they would still hold the base."""
    name: str | None = None
    """Registry name the output was recorded under, when it was."""
    already_registered: bool = False
    """The output has the fingerprint of the base already registered as ``name`` (subtract --exact restoring a
    registered base): that record stands, and the output is not recorded again."""
    base_changed: str | None = None
    """The name of the registered base whose folder the model merged into is, when its files changed since it was
    registered (the files merged are then recorded as a base of their own, by their fingerprint; the lineage says
    which)."""
    fingerprint: str | None = None


class GcItem(Record):
    path: str
    size: int
    """Bytes (a folder's: its files')."""


class GcReport(Record):
    """What `loraops gc` removed (`gc --json`), or would remove with ``dry_run``."""

    dry_run: bool
    items: list[GcItem]
    size: int
    """Bytes, over every item."""


class StoredFileProblem(Record):
    """A stored file `verify` found missing, changed, or held by no record: what Registry.verify returns, and the
    problems of `verify --json`."""

    ref: str
    file: str
    problem: str
    pull_again: str | None = None
    """For an adapter pulled from the Hub, the `loraops pull` that repairs it (hub.pull_again)."""


class VerifyReport(Record):
    """What `loraops verify` found (`verify --json`): ``ok`` when every stored file matches its sha256 (else the command
    still exits non-zero, after the JSON)."""

    ok: bool
    adapters: int
    """How many registered adapters' stored files were hashed."""
    problems: list[StoredFileProblem]


class DbChange(Record):
    """What `db upgrade` or `db stamp` did (`--json`): the registry's revision before and after."""

    url: str
    """The registry's URL, without its password."""
    before: str | None
    """The revision it recorded before; None where it recorded none (an empty registry; stamp: tables whose
    revision record was lost). Equal to ``after``: nothing was changed."""
    after: str
    """The revision it records now: this loraops' head."""


class DbRevision(Record):
    """The registry's schema revision (`db current --json`)."""

    url: str
    """The registry's URL, without its password."""
    revision: str | None
    """Its recorded Alembic revision; None when it records none (state missing, empty or unversioned)."""
    head: str
    """This loraops' revision."""
    state: Literal["head", "behind", "newer", "empty", "unversioned", "missing"]
    """head: up to date; behind: `db upgrade` brings it to head; newer: written by a newer loraops; empty: no tables
    yet; unversioned: tables but no revision recorded (`db stamp`, or another program's); missing: no SQLite file."""
