"""--conv-rank (kohya's --new_conv_rank / --conv_dim): k×k convolutions get their own rank in resize and extract.
Each module against a float64 truncated SVD of its delta at the rank it should get, the results loaded by PEFT
(rank_pattern) and compared by outputs, kohya files' per-module alphas, lineage, default names, one-line errors."""
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from factories import (conv_embedding_model, conv_peft_adapter, kohya_file, lora_adapter, peft_delta_weights,
                       save_state_dict)
from loraops import algebra
from loraops.adapter import LoraModule
from loraops.cli import main
from loraops.formats import read_adapter, write_adapter
from loraops.ops.combine import METHODS, rank_ceiling
from loraops.ops.resize import RankRule, resize_module
from loraops.registry import Registry

CONV3 = "conv3"  # conv_embedding_model's 3×3 Conv2d (8 → 6); conv1 is 1×1 (4 → 8), proj a Linear (16 → 24)


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def truncated(D: torch.Tensor, k: int) -> torch.Tensor:
    """The best rank-k approximation of D (flattened to out × in·k…), in float64, in D's shape."""
    M = D.double().reshape(D.shape[0], -1)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return ((U[:, :k] * S[:k]) @ Vh[:k]).reshape(D.shape)


def outputs(model, ids, image):
    with torch.no_grad():
        return model(ids, image)


def model_with(deltas: dict[str, torch.Tensor]):
    """conv_embedding_model() with ``deltas`` added to its weights (the reference of a merged adapter)."""
    model = conv_embedding_model()
    with torch.no_grad():
        for name, delta in deltas.items():
            weight = model.get_submodule(name).weight
            weight += delta.to(weight.dtype).reshape(weight.shape)
    return model


INPUTS = (torch.arange(5).unsqueeze(0), torch.randn(1, 4, 7, 7, generator=torch.Generator().manual_seed(9)))


def assert_peft_equals(folder, expected: dict[str, torch.Tensor]):
    """PEFT loads ``folder`` on conv_embedding_model(): its deltas and its outputs are the expected deltas'."""
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(conv_embedding_model(), folder).eval()
    deltas = peft_delta_weights(loaded)
    assert deltas.keys() == expected.keys()
    for name, delta in expected.items():
        torch.testing.assert_close(deltas[name].double(), delta.reshape(deltas[name].shape), rtol=1e-5, atol=1e-6)
    for got, want in zip(outputs(loaded, *INPUTS), outputs(model_with(expected), *INPUTS)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def _conv_module(rank=5, seed=0, kernel=(3, 3)) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    return LoraModule("c", A=torch.randn(rank, 4, *kernel, generator=g, dtype=torch.float64),
                      B=torch.randn(7, rank, 1, 1, generator=g, dtype=torch.float64), alpha=2.5, scale=0.5,
                      kind="conv")


def test_rule_ranks_kxk_convolutions_by_conv_rank_and_keeps_the_scale():
    """A 3×3 conv gets conv_rank, a 1×1 conv and a Linear get rank (sd-scripts' networks/lora.py ranks a 1×1 conv
    as a Linear); each is the float64 truncated SVD of its delta at that rank, with the module's scale."""
    rule = RankRule(rank=3, conv_rank=2)
    g = torch.Generator().manual_seed(1)
    linear = LoraModule("l", A=torch.randn(5, 9, generator=g, dtype=torch.float64),
                        B=torch.randn(7, 5, generator=g, dtype=torch.float64), alpha=2.5, scale=0.5)
    for module, k in ((_conv_module(), 2), (_conv_module(kernel=(1, 1)), 3), (linear, 3)):
        resized, record = resize_module(module, rule, "classic", torch.device("cpu"), torch.float64)
        assert (resized.rank, record.rank_after, record.spatial) == (k, k, k == 2)
        assert resized.scale == 0.5 and resized.alpha == 0.5 * k
        torch.testing.assert_close(resized.delta(dtype=torch.float64), truncated(module.delta(dtype=torch.float64), k),
                                   rtol=0, atol=1e-12)


def test_with_a_dynamic_rule_conv_rank_caps_the_convolutions_as_max_rank_the_others():
    """kohya's --new_conv_rank is the convolutions' hard limit of a dynamic rank (--new_rank the others')."""
    rule = RankRule(dynamic="sv_fro", param=1.0, max_rank=4, conv_rank=2)  # sv_fro 1: every singular value
    conv, _ = resize_module(_conv_module(), rule, "classic", torch.device("cpu"), torch.float64)
    flat, _ = resize_module(_conv_module(kernel=(1, 1)), rule, "classic", torch.device("cpu"), torch.float64)
    assert (conv.rank, flat.rank) == (2, 4)


@pytest.mark.registry_backend
def test_resize_conv_rank_as_peft_loads_with_rank_pattern_and_lineage(tmp_path):
    source = conv_peft_adapter(tmp_path / "src", r=4, alpha=8)
    original = read_adapter(source)
    code, out = run("resize", source, "--rank", "3", "--conv-rank", "2", "--precise", "-o", tmp_path / "out")
    assert code == 0, out
    assert "registered src-r3-conv2@1" in out and "capped" not in out
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert [config["r"], *config["rank_pattern"].values()] == [3, 2]
    expected = {name: truncated(m.delta(dtype=torch.float64), 2 if name == CONV3 else 3)
                for name, m in original.modules.items()}
    assert_peft_equals(tmp_path / "out", expected)
    with Registry.open() as reg:
        record = reg.get_adapter("src-r3-conv2")
        assert record.lineage.op == "resize" and record.lineage.params == {"rank": 3, "conv_rank": 2}
    code, out = run("resize", source, "--rank", "3", "--json")
    assert code == 0, out
    plain = json.loads(out)
    assert plain["adapter"]["name"] == "src-r3" and plain["report"]["conv_rank"] is None
    assert {m["name"]: m["rank_after"] for m in plain["report"]["modules"]}[CONV3] == 3
    with Registry.open() as reg:
        assert reg.get_adapter("src-r3").lineage.params == {"rank": 3}  # as before: no conv_rank recorded


def test_resize_table_names_each_convolutions_kernel(tmp_path):
    """The table's kind tells a 1×1 conv (ranked by --rank) from a 3×3 one (by --conv-rank); --json has the kernel
    beside spatial (null for the other layers)."""
    source = conv_peft_adapter(tmp_path / "src", r=4, alpha=8)
    code, out = run("resize", source, "--rank", "3", "--conv-rank", "2")
    assert code == 0, out
    kinds = {line.split()[0]: line.split()[1] for line in out.splitlines()[2:6]}
    assert kinds == {"embed": "embedding", "proj": "linear", "conv1": "conv1x1", CONV3: "conv3x3"}, out
    code, out = run("resize", source, "--rank", "3", "--json")
    assert code == 0, out
    assert {m["name"]: (m["kind"], m["kernel"], m["spatial"]) for m in json.loads(out)["report"]["modules"]} == {
        "embed": ("embedding", None, False), "proj": ("linear", None, False), "conv1": ("conv", [1, 1], False),
        CONV3: ("conv", [3, 3], True)}


@pytest.mark.registry_backend
def test_resize_dynamic_with_conv_rank_is_named_and_recorded(tmp_path):
    source = conv_peft_adapter(tmp_path / "src", r=4, alpha=8)
    code, out = run("resize", source, "--dynamic", "sv_fro", "--param", "1", "--conv-rank", "1", "--json")
    assert code == 0, out
    result = json.loads(out)
    assert result["adapter"]["name"] == "src-sv_fro1-conv1" and result["report"]["conv_rank"] == 1
    assert {m["name"]: (m["rank_after"], m["spatial"]) for m in result["report"]["modules"]} == {
        "embed": (4, False), "proj": (4, False), "conv1": (4, False), CONV3: (1, True)}
    with Registry.open() as reg:
        assert reg.get_adapter("src-sv_fro1-conv1").lineage.params == {
            "dynamic": "sv_fro", "param": 1.0, "max_rank": None, "conv_rank": 1}


def test_resize_kohya_writes_each_modules_rank_and_alpha(tmp_path):
    """sd-scripts reads each module's rank from its lora_down and its scale from its own .alpha."""
    source = kohya_file(tmp_path / "k.safetensors", {"lora_unet_a_proj": ((10,), (12,)),
                                                    "lora_unet_a_conv": ((6, 3, 3), (5, 1, 1))}, rank=4, alpha=2.0)
    original = read_adapter(source)
    code, out = run("resize", source, "--rank", "3", "--conv-rank", "2", "--precise", "-o", tmp_path / "r.safetensors")
    assert code == 0, out
    tensors = load_file(tmp_path / "r.safetensors")
    assert tensors["lora_unet_a_conv.lora_down.weight"].shape == (2, 6, 3, 3)
    assert tensors["lora_unet_a_conv.lora_up.weight"].shape == (5, 2, 1, 1)
    assert tensors["lora_unet_a_proj.lora_down.weight"].shape == (3, 10)
    # scale 2/4 kept: alpha = 0.5 · the new rank
    assert (float(tensors["lora_unet_a_conv.alpha"]), float(tensors["lora_unet_a_proj.alpha"])) == (1.0, 1.5)
    # the network args have the convolutions' dim/alpha, network_dim/alpha the others' (sd-scripts' LoCon metadata);
    # dims as ints, alphas as Python floats, as sd-scripts' resize_lora.py and extract_lora_from_models.py write them
    metadata = read_adapter(tmp_path / "r.safetensors").metadata
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("3", "1.5")
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}
    resized = read_adapter(tmp_path / "r.safetensors")
    for name, module in original.modules.items():
        k = 2 if module.spatial else 3
        torch.testing.assert_close(resized.modules[name].delta(dtype=torch.float64),
                                   truncated(module.delta(dtype=torch.float64), k), rtol=0, atol=1e-6)


@pytest.fixture
def conv_pair(tmp_path):
    """conv_embedding_model() and a fine-tune of it with a rank-4 change in proj, conv1 and conv3."""
    model = conv_embedding_model()
    base = save_state_dict(model, tmp_path / "base.safetensors")
    g = torch.Generator().manual_seed(0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name in ("proj.weight", "conv1.weight", "conv3.weight"):
        weight = state[name]
        M = torch.randn(weight.shape[0], 4, generator=g) @ torch.randn(4, weight[0].numel(), generator=g)
        weight += 0.1 * M.reshape(weight.shape)
    tuned = tmp_path / "tuned.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(tuned))
    deltas = {name.removesuffix(".weight"): (state[name].double() - model.state_dict()[name].double())
              for name in ("proj.weight", "conv1.weight", "conv3.weight")}
    return base, tuned, deltas


@pytest.mark.registry_backend
def test_extract_conv_rank_is_the_truncated_svd_peft_loads_and_lineage(conv_pair, tmp_path):
    base, tuned, deltas = conv_pair
    code, out = run("extract", "--base", base, "--tuned", tuned, "--rank", "3", "--conv-rank", "2", "--precise",
                    "-o", tmp_path / "out")
    assert code == 0, out
    assert "registered tuned-r3-conv2@1" in out and "capped" not in out
    # the table's kind tells the 1×1 conv (ranked by --rank) from the 3×3 one (by --conv-rank), as resize's does
    assert {line.split()[0]: line.split()[1] for line in out.splitlines()[2:5]} == {
        "proj": "linear", "conv1": "conv1x1", CONV3: "conv3x3"}, out
    extracted = read_adapter(tmp_path / "out")
    assert {n: m.rank for n, m in extracted.modules.items()} == {"proj": 3, "conv1": 3, CONV3: 2}
    expected = {name: truncated(D, 2 if name == CONV3 else 3) for name, D in deltas.items()}
    assert_peft_equals(tmp_path / "out", expected)
    with Registry.open() as reg:
        params = reg.get_adapter("tuned-r3-conv2").lineage.params
        assert (params["rank"], params["conv_rank"]) == (3, 2)
    code, out = run("extract", "--base", base, "--tuned", tuned, "--rank", "3", "--json")
    assert code == 0, out
    plain = json.loads(out)
    assert plain["report"]["conv_rank"] is None and [m["spatial"] for m in plain["report"]["modules"]].count(True) == 1
    with Registry.open() as reg:
        assert "conv_rank" not in reg.get_adapter(plain["adapter"]["name"]).lineage.params


def test_extract_conv_rank_above_the_convolutions_is_capped_in_name_and_said(conv_pair):
    """conv3's delta (6 × 8·3·3) has rank ≤ 6: --conv-rank 9 gives it 6, and the name says so."""
    base, tuned, _ = conv_pair
    code, out = run("extract", "--base", base, "--tuned", tuned, "--rank", "2", "--conv-rank", "9")
    assert code == 0, out
    assert "--conv-rank 9 capped: no k×k convolution is larger than rank 6 (min(out, in))\n" in out
    assert "--rank 2 capped" not in out and "registered tuned-r2-conv6@1" in out, out


def test_a_conv_only_adapter_is_named_by_its_conv_rank_alone(conv_pair, tmp_path):
    """--rank ranks no module of an adapter of k×k convs only (it is required beside --conv-rank): the name says
    -conv<C> alone, not -r<R> of a rank no module has; a dynamic rule still ranks the convs, and stays in the name."""
    source = _kohya_convs_of_ranks(tmp_path / "k.safetensors", {"lora_unet_b_conv": 4}, linear=0)
    code, out = run("resize", source, "--rank", "3", "--conv-rank", "2")
    assert code == 0, out
    assert "registered k-conv2@1" in out, out
    code, out = run("resize", source, "--dynamic", "sv_fro", "--param", "1", "--conv-rank", "1")
    assert code == 0 and "registered k-sv_fro1-conv1@1" in out, out
    base, tuned, _ = conv_pair
    code, out = run("extract", "--base", base, "--tuned", tuned, "--modules", "conv3", "--rank", "3", "--conv-rank",
                    "2")
    assert code == 0 and "registered tuned-conv2@1" in out, out


def assert_nothing_registered():
    with Registry.open() as reg:
        assert reg.list_adapters() == [] and reg.list_bases() == []


@pytest.mark.parametrize("args, message", [
    (["--rank", "2", "--conv-rank", "0"],
     "error: bad parameters for resize: --conv-rank: Input should be greater than 0"),
    (["--rank", "2", "--conv-rank", "5"],
     "error: conv rank 5 is above the adapter's k×k convolutions' rank 4: resize only lowers rank"),
])
def test_resize_errors_are_one_line(tmp_path, args, message):
    source = conv_peft_adapter(tmp_path / "src", r=4, alpha=8)
    code, out = run("resize", source, *args, "-o", tmp_path / "out")
    assert (code != 0, out.count("\n")) == (True, 1) and out == message + "\n", out
    assert not (tmp_path / "out").exists()
    assert_nothing_registered()


def test_conv_rank_without_a_kxk_convolution_is_refused(conv_pair, tmp_path):
    """A --conv-rank that would rank nothing (only Linears and 1×1 convs) is refused, not ignored as sd-scripts does."""
    only_flat = lora_adapter({"proj": (24, 16)}, rank=4)
    write_adapter(only_flat, tmp_path / "flat", "peft")
    code, out = run("resize", tmp_path / "flat", "--rank", "2", "--conv-rank", "2")
    assert code != 0 and out == ("error: conv rank 2: flat@1 has no k×k convolution (a conv with a kernel larger "
                                 "than 1×1) for it to rank\n"), out
    assert_nothing_registered()
    base, tuned, _ = conv_pair
    code, out = run("extract", "--base", base, "--tuned", tuned, "--modules", "proj,conv1", "--rank", "2",
                    "--conv-rank", "2", "-o", tmp_path / "out")
    assert code != 0 and out.count("\n") == 1 and out.startswith("error: conv rank 2: the extract of ") and \
        "has no k×k convolution" in out, out
    assert not (tmp_path / "out").exists()
    assert_nothing_registered()



def _kohya_convs_of_ranks(path, ranks: dict[str, int], linear: int = 4):
    """A kohya file with a Linear (rank ``linear``; 0: none) and 3×3 convs of the given ranks (at most 5), each with
    alpha rank/2."""
    shapes = {"lora_unet_a_proj": ((10,), (12,)), **{name: ((6, 3, 3), (5, 1, 1)) for name in ranks}}
    tensors = load_file(kohya_file(path, shapes, rank=5, alpha=2.0))
    if not linear:  # no Linear at all
        tensors = {k: v for k, v in tensors.items() if not k.startswith("lora_unet_a_proj.")}
    for name, k in {**({"lora_unet_a_proj": linear} if linear else {}), **ranks}.items():
        tensors[f"{name}.lora_down.weight"] = tensors[f"{name}.lora_down.weight"][:k].contiguous()
        tensors[f"{name}.lora_up.weight"] = tensors[f"{name}.lora_up.weight"][:, :k].contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(k / 2)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


def test_kohya_metadata_of_convs_of_different_ranks_is_dynamic(tmp_path):
    """conv_dim/conv_alpha are one value only when every k×k conv has it (as ss_network_dim/alpha for the others):
    convs of ranks 2 and 3 (a dynamic resize's) are "Dynamic", not the last conv's rank."""
    source = _kohya_convs_of_ranks(tmp_path / "k.safetensors", {"lora_unet_b_conv": 3, "lora_unet_c_conv": 2})
    code, out = run("export", source, "--format", "kohya", "-o", tmp_path / "out.safetensors")
    assert code == 0, out
    metadata = read_adapter(tmp_path / "out.safetensors").metadata
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "2.0")
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "Dynamic", "conv_alpha": "Dynamic"}
    same = _kohya_convs_of_ranks(tmp_path / "same.safetensors", {"lora_unet_b_conv": 2, "lora_unet_c_conv": 2})
    code, out = run("export", same, "--format", "kohya", "-o", tmp_path / "same-out.safetensors")
    assert code == 0, out
    assert json.loads(read_adapter(tmp_path / "same-out.safetensors").metadata["ss_network_args"]) == {
        "conv_dim": "2", "conv_alpha": "1.0"}


SOURCE_ARGS = {
    # how it was trained and which blocks it trained: true of what resize or export writes
    "rank_dropout": "0.1", "module_dropout": "0.05", "loraplus_lr_ratio": "16", "down_lr_weight": "sine",
    "train_blocks": "single",
    # its ranks and alphas (the written modules' are in each module; conv_dim/conv_alpha are made anew)
    "conv_dim": "4", "conv_alpha": "2", "block_dims": "4,4,4", "in_dims": "[4,0,0,0,0]", "img_attn_dim": "8",
    # lora_flux's LoRA of one rank per part of qkv (down stacked, up block-diagonal): a resize's SVD of the qkv
    # delta is one LoRA of any rank, which sd-scripts' split loader (down chunked per part, up's diagonal) misreads
    "split_qkv": "True",
    # LyCORIS' arguments: the file is written as sd-scripts' networks.lora, which has none of them
    "algo": "locon", "use_tucker": True, "preset": "full", "dropout": "0.1",
}
KEPT_ARGS = {"rank_dropout": "0.1", "module_dropout": "0.05", "loraplus_lr_ratio": "16", "down_lr_weight": "sine",
             "train_blocks": "single"}


@pytest.mark.parametrize("module", ["lycoris.kohya", "networks.lora"])
def test_kohya_writer_keeps_the_source_network_args_that_stay_true(tmp_path, module):
    """resize: the source's training settings stay, its ranks/alphas and LyCORIS' algo do not; conv_dim/conv_alpha
    are the written convs'. export of a file without k×k convs: no conv_dim/conv_alpha at all (the source's claimed
    some). Whatever network the source names: the written one is networks.lora."""
    source = kohya_file(tmp_path / "k.safetensors", {"lora_unet_a_proj": ((10,), (12,)),
                                                    "lora_unet_a_conv": ((6, 3, 3), (5, 1, 1))}, rank=4, alpha=2.0,
                        metadata={"ss_network_module": module, "ss_network_args": json.dumps(SOURCE_ARGS)})
    code, out = run("resize", source, "--rank", "3", "--conv-rank", "2", "-o", tmp_path / "r.safetensors")
    assert code == 0, out
    metadata = read_adapter(tmp_path / "r.safetensors").metadata
    assert metadata["ss_network_module"] == "networks.lora"
    assert json.loads(metadata["ss_network_args"]) == {**KEPT_ARGS, "conv_dim": "2", "conv_alpha": "1.0"}
    flat = kohya_file(tmp_path / "flat.safetensors", {"lora_unet_a_proj": ((10,), (12,))},
                      metadata={"ss_network_module": module, "ss_network_args": json.dumps(SOURCE_ARGS)})
    code, out = run("export", flat, "--format", "kohya", "-o", tmp_path / "flat-out.safetensors")
    assert code == 0, out
    assert json.loads(read_adapter(tmp_path / "flat-out.safetensors").metadata["ss_network_args"]) == KEPT_ARGS


@pytest.mark.parametrize("args", ["not json", "null", '["conv_dim", "4"]', "", '{"rank_dropout": NaN}'])
def test_kohya_writer_ignores_network_args_that_are_no_dict(tmp_path, args):
    """LyCORIS writes "null" for no arguments; anything but a JSON object is no arguments (never a failed write).
    Python's json reads NaN and Infinity, which are no JSON: written back, they would make the header's
    ss_network_args unreadable to a strict parser."""
    flat = kohya_file(tmp_path / "flat.safetensors", {"lora_unet_a_proj": ((10,), (12,))},
                      metadata={"ss_network_args": args})
    code, out = run("export", flat, "--format", "kohya", "-o", tmp_path / "out.safetensors")
    assert code == 0, out
    assert read_adapter(tmp_path / "out.safetensors").metadata["ss_network_args"] == "{}"


@pytest.mark.parametrize("linear, conv, args, message", [
    # --rank is checked against the Linear alone, --conv-rank against the convs alone, whichever group is larger
    (4, 2, ["--rank", "5", "--conv-rank", "2"], "error: rank 5 is above the adapter's rank 4: resize only lowers rank"),
    (4, 2, ["--rank", "4", "--conv-rank", "3"],
     "error: conv rank 3 is above the adapter's k×k convolutions' rank 2: resize only lowers rank"),
    (2, 4, ["--rank", "3", "--conv-rank", "2"], "error: rank 3 is above the adapter's rank 2: resize only lowers rank"),
])
def test_resize_checks_each_group_against_its_own_rank(tmp_path, linear, conv, args, message):
    source = _kohya_convs_of_ranks(tmp_path / "k.safetensors", {"lora_unet_b_conv": conv}, linear)
    code, out = run("resize", source, *args)
    assert code != 0 and out == message + "\n", out
    assert_nothing_registered()


def test_resize_rank_between_the_groups_ranks_is_accepted(tmp_path):
    """--rank 3 on a rank-4 Linear with rank-2 convs and --conv-rank 2: each group at or below its own rank."""
    source = _kohya_convs_of_ranks(tmp_path / "k.safetensors", {"lora_unet_b_conv": 2})
    code, out = run("resize", source, "--rank", "3", "--conv-rank", "2", "--json")
    assert code == 0, out
    assert {m["name"]: m["rank_after"] for m in json.loads(out)["report"]["modules"]} == {
        "lora_unet_a_proj": 3, "lora_unet_b_conv": 2}
    code, out = run("resize", source, "--rank", "3", "--conv-rank", "1")
    assert code == 0 and "capped" not in out, out


def test_capped_lines_count_each_group_and_not_a_dynamic_rule(conv_pair):
    """extract: --rank 20 is capped by the largest Linear/1×1 conv (proj: min(24, 16) = 16), not by conv3; a dynamic
    rule's --conv-rank is a cap of a rule, and says nothing when no conv reaches it."""
    base, tuned, _ = conv_pair
    code, out = run("extract", "--base", base, "--tuned", tuned, "--rank", "20", "--conv-rank", "2")
    assert code == 0, out
    assert "--rank 20 capped: no module is larger than rank 16 (min(out, in))\n" in out and "--conv-rank" not in out
    assert "registered tuned-r16-conv2@1" in out, out
    code, out = run("extract", "--base", base, "--tuned", tuned, "--modules", "conv1,conv3", "--rank", "20",
                    "--conv-rank", "5")  # conv1 (1×1, 4 → 8) is at most rank 4, conv3 gets 5
    assert code == 0, out
    assert "--rank 20 capped: no module is larger than rank 4 (min(out, in))\n" in out and "--conv-rank" not in out
    assert "registered tuned-r4-conv5@1" in out, out
    code, out = run("extract", "--base", base, "--tuned", tuned, "--dynamic", "sv_fro", "--param", "0.5",
                    "--conv-rank", "9")
    assert code == 0 and "capped" not in out, out


def test_a_lycoris_loha_resized_to_kohya_is_a_plain_lora_and_says_nothing_of_loha(tmp_path):
    """resize of a LyCORIS LoHa writes a plain LoRA (lora_down/lora_up, an SVD of each ΔW): its header names
    sd-scripts' networks.lora and keeps no LyCORIS argument (an algo "loha" would make LyCORIS' loader build LoHa
    modules the file has no weights for), only the training settings that stay true and the convs' dim/alpha."""
    from test_lycoris import lycoris_file

    path, _ = lycoris_file(tmp_path / "lyco.safetensors", "loha", rank=3, alpha=2.0)
    save_file(load_file(path), str(path), metadata={"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(
        {"algo": "loha", "conv_dim": "3", "conv_alpha": "2", "rank_dropout": "0.1"})})
    base = save_state_dict(conv_embedding_model(), tmp_path / "base.safetensors")
    for args in (["base", "add", base, "--name", "tiny"], ["register", path, "--name", "lyco", "--base", "tiny"],
                 ["resize", "lyco", "--rank", "2", "--format", "kohya", "-o", tmp_path / "r.safetensors"]):
        code, out = run(*args)
        assert code == 0, out
    assert {key.split(".", 1)[1] for key in load_file(tmp_path / "r.safetensors")} == {
        "lora_down.weight", "lora_up.weight", "alpha"}
    metadata = read_adapter(tmp_path / "r.safetensors").metadata
    assert metadata["ss_network_module"] == "networks.lora"
    args = json.loads(metadata["ss_network_args"])
    assert args.keys() == {"rank_dropout", "conv_dim", "conv_alpha"} and args["conv_dim"] == "2", args
    assert float(args["conv_alpha"]) == pytest.approx(2 / 3 * 2)  # the LoHa's scale alpha/r kept at rank 2


def test_combine_svd_conv_rank_is_svd_merge_loras_new_conv_rank(tmp_path):
    """combine -m svd --rank R --conv-rank C (sd-scripts' svd_merge_lora.py --new_rank R --new_conv_rank C): each module
    the truncated SVD of Σ wᵢ·sᵢ·upᵢ·downᵢ (float64), the k×k convolutions at C, every other module (a 1×1 conv too)
    at R, scale 1; the lineage records conv_rank; a combine with nothing for it to rank, or a method that keeps every
    rank, refuses it in one line."""
    shapes = {"lora_unet_a_proj": ((10,), (12,)), "lora_unet_a_conv": ((6, 3, 3), (5, 1, 1)),
              "lora_unet_a_proj_in": ((6, 1, 1), (7, 1, 1))}
    a = kohya_file(tmp_path / "a.safetensors", shapes, rank=4, alpha=2.0, seed=1)
    b = kohya_file(tmp_path / "b.safetensors", shapes, rank=5, alpha=3.0, seed=2)
    out = tmp_path / "m.safetensors"
    code, text = run("combine", f"{a}:0.7", f"{b}:0.5", "-m", "svd", "--rank", "3", "--conv-rank", "2", "--precise",
                     "--name", "m", "-o", out)
    assert code == 0, text
    inputs = [(read_adapter(a), 0.7), (read_adapter(b), 0.5)]
    merged = read_adapter(out)
    for name in shapes:
        k = 2 if name == "lora_unet_a_conv" else 3
        expected = truncated(sum(w * adapter.modules[name].delta(dtype=torch.float64) for adapter, w in inputs), k)
        assert (merged.modules[name].rank, merged.modules[name].scale) == (k, 1.0), name
        torch.testing.assert_close(merged.modules[name].delta(dtype=torch.float64), expected, rtol=0, atol=1e-6)
    with Registry.open() as reg:
        assert reg.get_adapter("m").lineage.params["conv_rank"] == 2
    flat = kohya_file(tmp_path / "flat.safetensors", {"lora_unet_a_proj": ((10,), (12,))})
    for args, message in (((flat, "-m", "svd", "--conv-rank", "2"),
                           "error: conv rank 2: the inputs have no k×k convolution (a conv with a kernel larger than "
                           "1×1) for it to rank\n"),
                          ((a, b, "--conv-rank", "2"),
                           "error: cat (combine's default --method) keeps every input's rank (their sum), so it takes "
                           "no --conv-rank: give --method linear with --conv-rank to truncate\n"),
                          ((a, b, "-m", "svd", "--conv-rank", "0"),
                           "error: --conv-rank must be a positive integer (got 0)\n")):
        code, text = run("combine", *args, "-o", tmp_path / "x.safetensors")
        assert (code, text) == (2, message)
        assert not (tmp_path / "x.safetensors").exists()


SHAPES = {"lora_unet_a_proj": ((10,), (12,)), "lora_unet_a_conv": ((6, 3, 3), (5, 1, 1)),
          "lora_unet_a_proj_in": ((6, 1, 1), (7, 1, 1))}


def test_combine_says_when_rank_and_conv_rank_are_capped(tmp_path):
    """combine --rank/--conv-rank above what every module it ranks can hold says so in resize's and extract's line
    (sd-scripts' svd_merge_lora.py caps silently): a factored method by min(Σ input ranks, out, in) (proj: min(4 + 5,
    12, 10) = 9; the 3×3 conv: min(9, 5, 6·9) = 5), an element-wise one by min(out, in) (proj: 10); a rank some module
    reaches says nothing."""
    a = kohya_file(tmp_path / "a.safetensors", SHAPES, rank=4, alpha=2.0, seed=1)
    b = kohya_file(tmp_path / "b.safetensors", SHAPES, rank=5, alpha=3.0, seed=2)
    code, out = run("combine", a, b, "-m", "svd", "--rank", "20", "--conv-rank", "20", "--name", "m")
    assert code == 0, out
    assert ("--rank 20 capped: no module is larger than rank 9 (min(Σ input ranks, out, in))\n"
            "--conv-rank 20 capped: no k×k convolution is larger than rank 5 (min(Σ input ranks, out, in))\n") in out
    code, out = run("combine", a, b, "-m", "ties", "--density", "0.5", "--rank", "20", "--name", "t")
    assert code == 0, out
    assert "--rank 20 capped: no module is larger than rank 10 (min(out, in))\n" in out and "--conv-rank" not in out
    code, out = run("combine", a, b, "-m", "svd", "--rank", "9", "--conv-rank", "5", "--name", "s")
    assert code == 0 and "capped" not in out, out


def test_combine_json_reports_the_ranks_asked_for_and_written(tmp_path):
    """combine --json: the report's rank and conv_rank are the ones asked for (null: the method's default), each
    module's rank the one written and spatial whether --conv-rank ranks it, as resize's and extract's reports say."""
    a = kohya_file(tmp_path / "a.safetensors", SHAPES, rank=4, alpha=2.0, seed=1)
    b = kohya_file(tmp_path / "b.safetensors", SHAPES, rank=5, alpha=3.0, seed=2)
    code, out = run("combine", a, b, "-m", "svd", "--rank", "20", "--conv-rank", "2", "--name", "m", "--json")
    assert code == 0, out
    report = json.loads(out)["report"]
    assert (report["rank"], report["conv_rank"]) == (20, 2)
    assert {m["name"]: (m["rank"], m["spatial"]) for m in report["modules"]} == {
        "lora_unet_a_conv": (2, True), "lora_unet_a_proj": (9, False), "lora_unet_a_proj_in": (6, False)}
    code, out = run("combine", a, b, "-m", "svd", "--name", "d", "--json")
    assert code == 0, out
    report = json.loads(out)["report"]
    assert (report["rank"], report["conv_rank"]) == (None, None)
    assert {m["name"]: m["rank"] for m in report["modules"]} == {
        "lora_unet_a_conv": 5, "lora_unet_a_proj": 9, "lora_unet_a_proj_in": 6}


COMBINE_PARAMS = {"ties": {"density": 0.5}, "dare_ties": {"density": 0.5}, "dare_linear": {"density": 0.5},
                  "breadcrumbs": {"density": 0.8}, "breadcrumbs_ties": {"density": 0.8}, "della": {"density": 0.5},
                  "della_linear": {"density": 0.5}, "magnitude_prune": {"density": 0.5}}


@pytest.mark.parametrize("method", [m for m, spec in METHODS.items() if spec.default_rank is not None])
def test_every_combine_method_with_a_rank_ranks_the_kxk_convolutions_by_conv_rank(tmp_path, method):
    """Every method that takes --rank takes --conv-rank: its k×k convolution is the one it makes at --rank C, every
    other module (a 1×1 conv too) the one it makes at --rank R, or at its default rank without --rank."""
    shapes = {"lora_unet_a_proj": ((10,), (12,)), "lora_unet_a_conv": ((6, 3, 3), (5, 1, 1)),
              "lora_unet_a_proj_in": ((6, 1, 1), (7, 1, 1))}
    inputs = [(read_adapter(kohya_file(tmp_path / f"{i}.safetensors", shapes, rank=r, alpha=2.0, seed=i)), w)
              for i, (r, w) in enumerate(((4, 0.7), (5, 0.5), (3, 0.4))[:2 if method == "nuslerp" else 3])]

    def made(**ranks):
        return algebra.combine(inputs, method, COMBINE_PARAMS.get(method), precise=True, **ranks)[0].modules

    at_c, at_r, default = made(rank=2), made(rank=3), made()
    for ranks, others in (({"rank": 3, "conv_rank": 2}, at_r), ({"conv_rank": 2}, default)):
        for name, module in made(**ranks).items():
            expected = at_c[name] if name == "lora_unet_a_conv" else others[name]
            assert module.rank == expected.rank, (ranks, name)
            torch.testing.assert_close(module.delta(dtype=torch.float64), expected.delta(dtype=torch.float64),
                                       rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", [m for m, spec in METHODS.items() if spec.default_rank is not None])
def test_every_combine_methods_ranks_stop_at_its_rank_ceiling(tmp_path, method):
    """What rank_ceiling says bounds a module is what each method writes at a --rank/--conv-rank above it: min(Σ
    ranks of the inputs holding the module, out, in·k·k) or min(out, in·k·k); a module one input lacks (only) counts
    that input's rank as 0; --rank 2, below most bounds, gives min(2, bound)."""
    shapes = {"lora_unet_a_proj": ((10,), (12,)), "lora_unet_a_conv": ((6, 3, 3), (5, 1, 1))}
    paths = [kohya_file(tmp_path / "0.safetensors", {**shapes, "lora_unet_only": ((3,), (40,))}, rank=2, seed=0),
             kohya_file(tmp_path / "1.safetensors", shapes, rank=1, seed=1)]
    inputs = [(read_adapter(p), w) for p, w in zip(paths, (0.7, 0.5))]
    summed = {"lora_unet_a_proj": 3, "lora_unet_a_conv": 3, "lora_unet_only": 2}
    sizes = {"lora_unet_a_proj": (12, 10), "lora_unet_a_conv": (5, 54), "lora_unet_only": (40, 3)}
    ceiling = rank_ceiling(method)
    factored = ceiling.startswith("min(Σ")
    bound = {name: min(*size, *([summed[name]] if factored else [])) for name, size in sizes.items()}
    for ranks, k in (({"rank": 50, "conv_rank": 50}, 50), ({"rank": 2}, 2)):
        _, report = algebra.combine(inputs, method, COMBINE_PARAMS.get(method), **ranks)
        assert {m.name: m.rank for m in report.modules} == {n: min(k, bound[n]) for n in sizes}, (ranks, ceiling)


def _kind_column(out: str) -> dict[str, str]:
    """module → kind, from the module table `inspect` and `show` end with."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["module", "kind"])
    return {line.split()[0]: line.split()[1] for line in lines[start + 2:] if line.strip()}


def test_inspect_and_show_name_a_convolutions_kernel(tmp_path):
    """inspect and show say conv1x1/conv3x3 as resize's and extract's tables do (the kernel decides whether --rank or
    --conv-rank ranks it), and their JSON gives the kernel; show reads it from the stored file, bound to its base
    (a kohya file's modules named by the base's) or not."""
    peft = conv_peft_adapter(tmp_path / "peft")
    code, out = run("inspect", peft)
    assert code == 0, out
    assert _kind_column(out) == {"embed": "embedding", "proj": "linear", "conv1": "conv1x1", "conv3": "conv3x3"}
    code, out = run("inspect", peft, "--json")
    assert {m["name"]: m["kernel"] for m in json.loads(out)["modules"]} == {
        "embed": None, "proj": None, "conv1": [1, 1], "conv3": [3, 3]}
    assert run("register", peft, "--name", "p")[0] == 0
    code, out = run("show", "p")
    assert code == 0 and _kind_column(out)["conv1"] == "conv1x1" and _kind_column(out)["conv3"] == "conv3x3", out
    code, out = run("show", "p", "--json")
    assert {m["name"]: m["kernel"] for m in json.loads(out)["modules"]}["conv3"] == [3, 3]
    code, out = run("list", "--json")  # (the registry's rows record it)
    assert code == 0 and {m["name"]: m["kernel"] for m in json.loads(out)[0]["modules"]} == {
        "embed": None, "proj": None, "conv1": [1, 1], "conv3": [3, 3]}, out

    base = save_state_dict(conv_embedding_model(), tmp_path / "base.safetensors")
    kohya = kohya_file(tmp_path / "k.safetensors", {"lora_unet_conv1": ((4, 1, 1), (8, 1, 1)),
                                                    "lora_unet_conv3": ((8, 3, 3), (6, 1, 1))}, rank=2)
    assert run("base", "add", base, "--name", "b")[0] == 0
    code, out = run("register", kohya, "--name", "k", "--base", "b")
    assert code == 0, out
    code, out = run("show", "k")
    assert code == 0 and _kind_column(out) == {"conv1": "conv1x1", "conv3": "conv3x3"}, out


def test_show_of_a_conv_adapter_whose_stored_file_is_damaged_still_shows_it(tmp_path):
    """show reads the kernel of a conv row that does not record one (registered before revision 0007 without a base)
    from the stored file; a file gone or damaged (verify's to report) leaves the kernel unknown (kind conv, kernel
    null) and the record still shown, as lora_bias is left unknown."""
    from sqlalchemy import text

    assert run("register", conv_peft_adapter(tmp_path / "peft"), "--name", "p")[0] == 0
    with Registry.open() as reg, reg.engine.begin() as c:
        c.execute(text("UPDATE adapter_modules SET kernel = NULL"))
    code, out = run("show", "p", "--json")
    assert code == 0 and {m["name"]: m["kernel"] for m in json.loads(out)["modules"]}["conv3"] == [3, 3], out
    stored = Path(json.loads(run("show", "p", "--json")[1])["path"]) / "adapter_model.safetensors"
    stored.parent.chmod(0o755)
    stored.chmod(0o644)
    for damage in (lambda: stored.write_bytes(stored.read_bytes()[:100]), stored.unlink):
        damage()
        code, out = run("show", "p")
        assert code == 0 and _kind_column(out)["conv3"] == "conv" and "stored at" in out, out
        shown = CliRunner().invoke(main, ["show", "p", "--json"])  # (its note on the stored copy goes to stderr)
        assert shown.exit_code == 0 and all(m["kernel"] is None for m in json.loads(shown.stdout)["modules"]), out
        assert "note: p@1: its stored copy" in shown.stderr


@pytest.mark.sqlite_only
def test_show_reads_a_convs_kernel_without_opening_the_registry_for_writing(tmp_path):
    """show of an adapter with a conv opened the whole registry (SQLAlchemy, Alembic, a writable connection that
    switched an SQLite file to WAL) only to read the kernels from the stored file; it reads them through the same
    read-only reader as the record (reads.Reader.module_kernels, which Registry.module_kernels runs too)."""
    import os
    import sqlite3
    import subprocess
    import sys

    from loraops import settings

    base = save_state_dict(conv_embedding_model(), tmp_path / "base.safetensors")
    kohya = kohya_file(tmp_path / "k.safetensors", {"lora_unet_conv1": ((4, 1, 1), (8, 1, 1)),
                                                    "lora_unet_conv3": ((8, 3, 3), (6, 1, 1))}, rank=2)
    assert run("base", "add", base, "--name", "b")[0] == 0
    assert run("register", kohya, "--name", "k", "--base", "b")[0] == 0
    with Registry.open() as reg:
        assert reg.module_kernels("k") == {"conv1": (1, 1), "conv3": (3, 3)}  # (the library's, bound to b)
    database = settings.sqlite_database()
    connection = sqlite3.connect(database)  # (a registry restored from a copy in SQLite's default mode)
    connection.execute("PRAGMA journal_mode=DELETE")
    connection.close()
    code = ("import json, sys; from loraops.cli import main\n"
            "try: main(['show', 'k', '--json'])\n"
            "except SystemExit as e: assert not e.code, e.code\n"
            "heavy = {'sqlalchemy', 'alembic'} & set(sys.modules)\n"
            "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(settings.__file__).parents[1])})
    assert done.returncode == 0, done.stderr
    assert {m["name"]: m["kernel"] for m in json.loads(done.stdout)["modules"]} == {"conv1": [1, 1], "conv3": [3, 3]}
    connection = sqlite3.connect(database)
    assert connection.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    connection.close()
