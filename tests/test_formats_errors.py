"""Every bad input: the right error class and a one-line message naming the file and what is wrong."""
from __future__ import annotations

import json

import pytest
import torch

import factories
from loraops import st
from loraops.errors import FormatError, InvalidInputError, NotFoundError, UnsupportedAdapterError
from loraops.formats import read_adapter

pytestmark = pytest.mark.no_registry  # never opens a registry: skipped in the PostgreSQL pass


def write(path, tensors, metadata=None):
    st.write_safetensors(path, {k: torch.as_tensor(v) for k, v in tensors.items()}, metadata)
    return path


def raw(path, data: bytes):
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return path


def peft_folder(folder, tensors, **config):
    folder.mkdir()
    write(folder / "adapter_model.safetensors", tensors, {"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, **config}))
    return folder


P = "base_model.model.layer.q"
A, B = torch.ones(2, 3), torch.ones(4, 2)


def good(**extra):
    return {f"{P}.lora_A.weight": A, f"{P}.lora_B.weight": B, **extra}


CASES = {
    # DoRA (PEFT's lora_magnitude_vector) is read; what PEFT would load otherwise than it reads, or not at all, is not
    "dora-without-use-dora": (lambda d: peft_folder(d / "a", good(**{f"{P}.lora_magnitude_vector": torch.ones(4)})),
                              InvalidInputError, "has a DoRA magnitude .* but the config says use_dora: false"),
    "use-dora-without-magnitude": (lambda d: peft_folder(d / "a", good(), use_dora=True), InvalidInputError,
                                   "'layer.q' has no lora_magnitude_vector but the config says use_dora: true"),
    "dora-magnitude-length": (lambda d: peft_folder(d / "a", good(**{f"{P}.lora_magnitude_vector": torch.ones(3)}),
                                                    use_dora=True),
                              InvalidInputError, "DoRA magnitude .* is 3 float32, not 4 floating point"),
    "dora-magnitude-nan": (lambda d: peft_folder(d / "a", good(**{f"{P}.lora_magnitude_vector": torch.tensor(
        [1.0, float("nan"), 1.0, 1.0])}), use_dora=True), InvalidInputError, "lora_magnitude_vector' contains NaN"),
    "dora-magnitude-alone": (lambda d: peft_folder(d / "a", {**good(), "base_model.model.layer.k.lora_magnitude_vector":
                                                             torch.ones(4)}), InvalidInputError,
                             "has no lora_A/lora_B tensors for module 'layer.k'"),
    "dora-on-some-modules": (lambda d: write(d / "x.safetensors", {**good(**{f"{P}.lora_magnitude_vector": torch.ones(4)}),
                                                                   "base_model.model.layer.k.lora_A.weight": A,
                                                                   "base_model.model.layer.k.lora_B.weight": B},
                                             {"lora_alpha": "4"}),
                             InvalidInputError, "only some modules carry a DoRA magnitude"),
    "dora-with-target-parameters": (lambda d: peft_folder(d / "a", good(), use_dora=True, target_parameters=["q.weight"]),
                                    UnsupportedAdapterError, "use_dora with target_parameters"),
    "lycoris-dora": (lambda d: write(d / "x.safetensors", {"lora_unet_a.lora_down.weight": A, "lora_unet_a.lora_up.weight": B,
                                                           "lora_unet_a.dora_scale": torch.ones(4, 1)}),
                     UnsupportedAdapterError, "LyCORIS DoRA adapter .dora_scale."),
    # LoHa/LoKr are read (tests/test_lycoris.py): incomplete ones are refused, and so are their keys outside a kohya
    # file or a PEFT folder whose config says LOHA/LOKR
    "loha": (lambda d: write(d / "x.safetensors", {"lora_unet_a.hada_w1_a": A, "lora_unet_a.hada_w1_b": A}),
             InvalidInputError, "module 'lora_unet_a': no hada_w2_a"),
    "lokr": (lambda d: write(d / "x.safetensors", {"lora_unet_a.lokr_w1": A, "lora_unet_a.lokr_w2_a": A}),
             InvalidInputError, "lokr_w2_a and lokr_w2_b go together"),
    "loha-bare-peft": (lambda d: write(d / "x.safetensors", {"base_model.model.a.hada_w1_a": A}),
                       UnsupportedAdapterError, "a LoHa adapter .* outside a PEFT folder"),
    "lokr-in-lora-folder": (lambda d: peft_folder(d / "a", {"base_model.model.layer.q.lokr_w1": A}),
                            UnsupportedAdapterError, "a LoKr adapter"),
    "ia3": (lambda d: peft_folder(d / "a", {"base_model.model.layer.q.ia3_l": torch.ones(4)}, peft_type="IA3"),
            UnsupportedAdapterError, "IA3"),
    "ia3-keys": (lambda d: write(d / "x.safetensors", {"base_model.model.layer.q.ia3_l": torch.ones(4)}),
                 UnsupportedAdapterError, "IA3"),
    "oft": (lambda d: write(d / "x.safetensors", {"base_model.model.layer.q.oft_r": A}), UnsupportedAdapterError, "OFT"),
    "boft": (lambda d: peft_folder(d / "a", {f"{P}.boft_R": A}, peft_type="BOFT"), UnsupportedAdapterError, "BOFT"),
    "diff": (lambda d: write(d / "x.safetensors", {"lora_unet_a.diff": A, "lora_unet_a.diff_b": torch.ones(2)}),
             UnsupportedAdapterError, "full-weight difference"),
    "unknown-layout": (lambda d: write(d / "x.safetensors", {"model.embed.weight": A, "model.norm.weight": torch.ones(3)}),
                       FormatError, "unknown key layout.*model.embed.weight"),
    "unknown-peft-type": (lambda d: peft_folder(d / "a", good(), peft_type="SUPERLORA"), FormatError,
                          r"unknown peft_type 'SUPERLORA' \(loraops reads ADALORA, LOHA, LOKR, LORA, TRAINABLE_TOKENS, VERA\)$"),
    "unknown-flag": (lambda d: peft_folder(d / "a", good(), use_magic_scaling=True), UnsupportedAdapterError,
                     "use_magic_scaling"),
    # PEFT turns a variant's sub-config, even an empty {}, into its config object, which switches the variant on
    # (KaSA's {} merged 0.57 away from PEFT's model; Arrow's and BD-LoRA's {} fail PEFT's load)
    **{f"empty-{field}": (lambda d, field=field: peft_folder(d / "a", good(), **{field: {}}), UnsupportedAdapterError,
                          rf"\({field}\); loraops handles plain LoRA only")
       for field in ("kasa_config", "arrow_config", "use_bdlora", "velora_config", "monteclora_config")},
    # an init PEFT 0.21 does not know (its load refuses it) may be a newer PEFT's that rewrites the base, as PiSSA's does
    "unknown-init": (lambda d: peft_folder(d / "a", good(), init_lora_weights="rslora_svd"), UnsupportedAdapterError,
                     "init_lora_weights='rslora_svd' is no initialisation PEFT 0.21 knows"),
    "init-true-as-text": (lambda d: peft_folder(d / "a", good(), init_lora_weights="true"), UnsupportedAdapterError,
                          "init_lora_weights='true' is no initialisation PEFT 0.21 knows"),
    # tokens the config says were trained, missing from the file: PEFT's load fails (a KeyError), loraops merged the LoRA
    "token-indices-without-tokens": (lambda d: peft_folder(d / "a", good(), trainable_token_indices=[1, 2]),
                                     InvalidInputError, r"trainable_token_indices lists trainable tokens, but the file "
                                                        "holds no trainable_tokens_delta for them"),
    "token-indices-entry-without-tokens": (
        lambda d: peft_folder(d / "a", good(**{"base_model.model.embed.token_adapter.trainable_tokens_delta":
                                                   torch.ones(2, 3)}),
                              trainable_token_indices={"embed": [1, 2], "head": [3]}),
        InvalidInputError, r"trainable_token_indices\['head'\] lists trainable tokens, but the file holds no"),
    # PEFT matches a pattern key inside (.*\.)?(KEY)$: a key valid alone can be no regex there (an re.error traceback)
    "pattern-flags-inside": (lambda d: peft_folder(d / "a", good(), alpha_pattern={"(?i)Q": 3}), InvalidInputError,
                             r"alpha_pattern\['\(\?i\)Q'\] is no regular expression"),
    "pickle-folder": (lambda d: raw(d / "a" / "adapter_model.bin", b"PK\x03\x04junk" * 4).parent, FormatError, "pickle"),
    "no-config": (lambda d: (d / "a").mkdir() or write(d / "a" / "adapter_model.safetensors", good()) and d / "a",
                  FormatError, "no adapter_config.json"),
    "rank-mismatch": (lambda d: peft_folder(d / "a", good(**{f"{P}.lora_B.weight": torch.ones(4, 3)})),
                      InvalidInputError, "rank mismatch"),
    "missing-partner": (lambda d: peft_folder(d / "a", {f"{P}.lora_A.weight": A}), InvalidInputError,
                        "no matching B"),
    "kohya-missing-partner": (lambda d: write(d / "x.safetensors", {"lora_unet_a.lora_down.weight": A}),
                              InvalidInputError, "no matching up"),
    "nan": (lambda d: peft_folder(d / "a", good(**{f"{P}.lora_A.weight": torch.full((2, 3), float("nan"))})),
            InvalidInputError, "NaN or Inf"),
    "inf-kohya": (lambda d: write(d / "x.safetensors", {"lora_unet_a.lora_down.weight": A,
                                                         "lora_unet_a.lora_up.weight": torch.full((4, 2), float("inf"))}),
                  InvalidInputError, "NaN or Inf"),
    # every float dtype, float8 included (torch has no isfinite for it): NaN and ±Inf anywhere in a factor
    **{f"{bad}-{dtype}": (lambda d, bad=bad, dtype=dtype: write(d / "x.safetensors", {
        "lora_unet_a.lora_down.weight": A.to(getattr(torch, dtype)),
        "lora_unet_a.lora_up.weight": torch.ones(4, 2).index_fill_(1, torch.tensor([1]), float(bad)).to(getattr(torch, dtype))}),
        InvalidInputError, "NaN or Inf")
       for bad, dtype in [("nan", "bfloat16"), ("-inf", "float16"), ("inf", "float64"), ("nan", "float8_e4m3fn"),
                          ("-inf", "float8_e5m2")]},
    "int-factors": (lambda d: write(d / "x.safetensors", {"lora_unet_a.lora_down.weight": A.to(torch.int8),
                                                          "lora_unet_a.lora_up.weight": B.to(torch.int8)}),
                    InvalidInputError, "factors must be floating point, not torch.int8"),
    "target-parameters-number": (lambda d: peft_folder(d / "a", good(), target_parameters=5), InvalidInputError,
                                 "target_parameters=5 must be a list of parameter names"),
    "target-parameters-string": (lambda d: peft_folder(d / "a", good(), target_parameters="gate_up_proj"),
                                 InvalidInputError, "must be a list of parameter names"),
    "duplicate": (lambda d: peft_folder(d / "a", good(**{f"{P}.lora_A.default.weight": A})), InvalidInputError,
                  "duplicate module"),
    "r-zero": (lambda d: peft_folder(d / "a", good(), r=0), InvalidInputError, "r=0"),
    "negative-alpha": (lambda d: peft_folder(d / "a", good(), lora_alpha=-4), InvalidInputError, "negative alpha"),
    "negative-kohya-alpha": (lambda d: factories.kohya_file(d / "x.safetensors", {"lora_unet_a": ((3,), (4,))}, alpha=-1),
                             InvalidInputError, "negative alpha"),
    "conv-b-shape": (lambda d: write(d / "x.safetensors", {"lora_unet_c.lora_down.weight": torch.ones(2, 3, 3, 3),
                                                            "lora_unet_c.lora_up.weight": torch.ones(4, 2, 3, 3)}),
                     InvalidInputError, "out×r×1×1"),
    # (the other way round, a 2-D up beside a conv down, is LyCORIS DyLoRA's conv: tests/test_lycoris_package.py)
    "mixed-dims": (lambda d: write(d / "x.safetensors", {"lora_unet_c.lora_down.weight": torch.ones(2, 3),
                                                          "lora_unet_c.lora_up.weight": torch.ones(4, 2, 1, 1)}),
                   InvalidInputError, "factors must be 2-D matrices"),
    "conv-2d-up-5d": (lambda d: write(d / "x.safetensors", {"lora_unet_c.lora_down.weight": torch.ones(2, 3, 1, 1),
                                                             "lora_unet_c.lora_up.weight": torch.ones(4, 2, 1)}),
                      InvalidInputError, "conv factors must both be 3-, 4- or 5-D"),
    "two-adapters": (lambda d: peft_folder(d / "a", {f"{P}.lora_A.one.weight": A, f"{P}.lora_B.one.weight": B,
                                                      "base_model.model.layer.k.lora_A.two.weight": A,
                                                      "base_model.model.layer.k.lora_B.two.weight": B}),
                     FormatError, "several adapters"),
    "bad-config-json": (lambda d: peft_folder(d / "a", good()).joinpath("adapter_config.json").write_text("{oops")
                        and d / "a", FormatError, r"adapter config is not JSON \(Expecting property name enclosed in double quotes at line 1 column 2\)"),
    "no-tensors": (lambda d: write(d / "x.safetensors", {}), FormatError, "holds no tensors$"),
    "old-diffusers-processor": (lambda d: write(d / "x.safetensors", {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight": A,
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight": B}),
        FormatError, "an older diffusers LoRA layout .*save_lora_weights"),
    "old-diffusers-text-encoder": (lambda d: write(d / "x.safetensors", {
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight": A,
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight": B}),
        FormatError, "an older diffusers LoRA layout"),
    "not-safetensors": (lambda d: raw(d / "x.safetensors", b"hello world, not a tensor file"),
                        FormatError, "not a safetensors file"),
    # JSON has no bound on an integer's digits: a number beyond any float, or past Python's 4300-digit limit for
    # reading one, was an OverflowError / ValueError traceback
    "alpha-pattern-beyond-float": (lambda d: peft_folder(d / "a", good(), alpha_pattern={"q": 10**400}),
                                   InvalidInputError, r"alpha_pattern\['q'\]: alpha about 1e\+400 is beyond what float32"),
    "config-number-too-long": (lambda d: peft_folder(d / "a", good()).joinpath("adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 1' + "0" * 5000 + '}') and d / "a", FormatError,
        r"adapter config is not JSON \(a number of more than 4300 digits\)"),
    "metadata-config-number-too-long": (lambda d: write(d / "x.safetensors", good(), {
        "adapter_config": '{"lora_alpha": 1' + "0" * 5000 + '}'}), InvalidInputError, "no alpha in the file's metadata"),
    "header-number-too-long": (lambda d: raw(d / "x.safetensors", len(h := (
        '{"a.lora_A.weight": {"dtype": "F32", "shape": [1' + "0" * 5000 + '], "data_offsets": [0, 4]}}').encode()
    ).to_bytes(8, "little") + h + bytes(4)), FormatError, r"not a safetensors file \(header is not JSON\)"),
    # PEFT wraps only what the config's targeting selects (tests/test_formats_peft.py: against PEFT's own matching)
    "untargeted-module": (lambda d: peft_folder(d / "a", good(), target_modules=["k", "v"]), InvalidInputError,
                          "module 'layer.q' has LoRA weights that the config's target_modules leaves out"),
    "targeting-not-regex": (lambda d: peft_folder(d / "a", good(), target_modules=["q"], exclude_modules="(q"),
                            InvalidInputError, "config targeting holds no regular expression"),
    "targeting-of-another-type": (lambda d: peft_folder(d / "a", good(), target_modules=5), InvalidInputError,
                                  "config target_modules=5 is none of the values PEFT takes"),
    "targeting-list-of-another-type": (lambda d: peft_folder(d / "a", good(), target_modules=["q"],
                                                             layers_to_transform=[0, "1"]), InvalidInputError,
                                       r"config layers_to_transform=\[0, '1'\] is none of the values PEFT takes"),
    "named-adapters-only": (lambda d: (d / "a").mkdir() or peft_folder(d / "a" / "style", good()).parent, FormatError,
                            r"a/style\)$"),  # PEFT's save_pretrained of an adapter not named "default"
    "config-file": (lambda d: peft_folder(d / "a", good()) / "adapter_config.json", FormatError,
                    "a PEFT adapter's config, not the adapter: give its folder"),
    "unknown-kohya-key": (lambda d: write(d / "x.safetensors", {"lora_unet_a.lora_down.weight": A,
                                                                 "lora_unet_a.lora_up.weight": B, "lora_unet_a.scale": A}),
                          FormatError, "unknown keys in a kohya"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(case, tmp_path):
    make, error, pattern = CASES[case]
    path = make(tmp_path)
    with pytest.raises(error, match=pattern) as info:
        read_adapter(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path) in message  # names the file or folder


@pytest.mark.parametrize("field, value", [("monteclora_config", False), ("kasa_config", None), ("use_bdlora", None),
                                          ("alora_invocation_tokens", []), ("layer_replication", [])])
def test_a_variant_field_peft_reads_as_off_reads_as_a_plain_lora(field, value, tmp_path):
    """PEFT tests a variant's field by truthiness, after making a sub-config's dict ({} too) its config object: these
    values leave the variant off, and the adapter is a plain LoRA."""
    adapter = read_adapter(peft_folder(tmp_path / "a", good(), **{field: value}))
    assert list(adapter.modules) == ["layer.q"]


def test_missing_path(tmp_path):
    with pytest.raises(NotFoundError, match="no such file"):
        read_adapter(tmp_path / "nope.safetensors")


def test_bad_alpha_argument(tmp_path):
    path = peft_folder(tmp_path / "a", good())
    with pytest.raises(InvalidInputError, match="negative alpha"):
        read_adapter(path, alpha=-1)


@pytest.mark.parametrize("case", ["target-parameters-number", "target-parameters-string", "bad-config-json"])
def test_identity_of_a_malformed_adapter_is_hashed_or_refused_in_one_line(case, tmp_path):
    """merge hashes a path adapter before reading it: a malformed config must not be a traceback there either."""
    from loraops.errors import LoraopsError
    from loraops.formats import identity

    path = CASES[case][0](tmp_path)
    try:
        assert len(identity(path)) == 64
    except LoraopsError as exc:
        assert "\n" not in str(exc)


ALPHA_TINY = ("alpha 1e-50 is below what float32 holds (its smallest normal number is 1.2e-38): a kohya file stores "
              "alphas in float32, where this one would lose its precision or be 0 (alpha = rank)")
TINY = torch.tensor(1e-50, dtype=torch.float64)
Q = "transformer.transformer_blocks.0.attn.to_q"


@pytest.mark.parametrize("make, where", [
    (lambda d: peft_folder(d / "a", good(), lora_alpha=1e-50), "config lora_alpha"),
    (lambda d: peft_folder(d / "a", good(), alpha_pattern={"layer.q": 1e-50}), "config alpha_pattern['layer.q']"),
    (lambda d: write(d / "x.safetensors", {"lora_unet_a.lora_down.weight": A, "lora_unet_a.lora_up.weight": B,
                                           "lora_unet_a.alpha": TINY}), "lora_unet_a.alpha"),
    (lambda d: write(d / "x.safetensors", {f"{Q}.lora_A.weight": A, f"{Q}.lora_B.weight": B, f"{Q}.alpha": TINY}),
     f"{Q}.alpha"),
])
def test_an_alpha_below_float32_in_a_file_is_refused_as_one_given(tmp_path, make, where):
    """A file's alpha follows the rule of one given (given_alpha): a kohya or diffusers file's float64 alpha of 1e-50
    was read through float32, as 0, i.e. alpha = rank (scale 1); a PEFT config's lora_alpha 1e-50 was read, and its
    kohya export stored 0 (float32), read back as alpha = rank."""
    path = make(tmp_path)
    with pytest.raises(InvalidInputError) as info:
        read_adapter(path)
    shown = path / "adapter_config.json" if path.is_dir() else path
    assert str(info.value) == f"{shown}: {where}: {ALPHA_TINY}"


def test_an_adapter_config_nested_past_pythons_recursion_limit_is_one_line(tmp_path):
    """json.loads raised RecursionError (a traceback) on an adapter_config.json of 100,000 '['."""
    folder = tmp_path / "deep"
    folder.mkdir()
    st.write_safetensors(folder / "adapter_model.safetensors", {"base_model.model.q.lora_A.weight": torch.zeros(2, 4),
                                                                "base_model.model.q.lora_B.weight": torch.zeros(4, 2)})
    (folder / "adapter_config.json").write_text("[" * 100_000)
    with pytest.raises(FormatError, match=r"adapter_config.json: adapter config is not JSON \(nested deeper than "
                                          r"Python's recursion limit\)$"):
        read_adapter(folder)


def test_a_pattern_key_that_is_a_regex_only_inside_pefts_wrapper_is_read_as_peft_matches_it(tmp_path):
    """PEFT matches a key inside (.*\\.)?(KEY)$: 'layer.q)|(x' is no regex alone (main refused it), but PEFT loads it
    and its first alternative matches layer.q, whose alpha it sets."""
    from peft.utils.other import get_pattern_key

    key = "layer.q)|(x"
    assert get_pattern_key([key], "layer.q") == key
    adapter = read_adapter(peft_folder(tmp_path / "a", good(), alpha_pattern={key: 6}))
    assert adapter.modules["layer.q"].scale == 3.0  # alpha 6 over rank 2


@pytest.mark.parametrize("values", [True, False])
@pytest.mark.parametrize("key", ["lora_unet_a", Q])
def test_a_boolean_alpha_tensor_is_refused_and_an_integer_one_read(tmp_path, key, values):
    """A file's `.alpha` stored as a boolean tensor was read as alpha 1 (True) or 0, i.e. alpha = rank (False), by
    inspect, register and merge alike; it is refused as a config's `lora_alpha: true` is. An integer one (sd-scripts'
    torch.tensor(alpha) of an int) is an alpha."""
    from loraops.inspect import inspect_path

    down, up = ("lora_down", "lora_up") if key.startswith("lora_unet") else ("lora_A", "lora_B")
    factors = {f"{key}.{down}.weight": A, f"{key}.{up}.weight": B}
    path = write(tmp_path / "x.safetensors", {**factors, f"{key}.alpha": torch.tensor(values)})
    for read in (read_adapter, inspect_path):
        with pytest.raises(InvalidInputError) as info:
            read(path)
        assert str(info.value) == f"{path}: {key}.alpha: alpha {values} is not a finite number (a boolean tensor)"
    path = write(tmp_path / "y.safetensors", {**factors, f"{key}.alpha": torch.tensor(3)})
    for read in (read_adapter, inspect_path):
        assert read(path).alpha == 3.0
