"""The algebra on a CUDA device gives what it gives on the CPU (skipped without one)."""
import pytest
import torch

from factories import lora_adapter
from loraops.algebra import combine, resize

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SHAPES = {"m.q": (48, 64), "m.v": (16, 64), "m.o": (64, 48)}


@pytest.fixture
def inputs():
    return [(lora_adapter(SHAPES, rank=r, seed=s, dtype=torch.bfloat16), w) for r, s, w in ((4, 1, 0.7), (8, 2, -0.3))]


@pytest.mark.parametrize("method, params, rank", [("cat", {}, None), ("linear", {}, 6), ("ties", {"density": 0.3}, 8),
                                                  ("magnitude_prune", {"density": 0.5}, 8),
                                                  ("breadcrumbs_ties", {"density": 0.4, "gamma": 0.05}, 8),
                                                  ("ties", {"density": 0.3, "rescale_norm": "l2"}, 8),
                                                  ("sce", {"select_topk": 0.3, "consensus": "count"}, 8),
                                                  ("nuslerp", {"flatten": False}, None),
                                                  ("model_stock", {"filter_wise": True}, 6),
                                                  ("multislerp", {}, None)])
@pytest.mark.parametrize("precise", [False, True])
def test_combine_on_cuda_matches_cpu(inputs, method, params, rank, precise):
    if method == "nuslerp":  # (its weights place t: ≥ 0)
        inputs = [(adapter, abs(weight)) for adapter, weight in inputs]
    cpu, cpu_report = combine(inputs, method, params, rank=rank, device="cpu", precise=precise)
    gpu, gpu_report = combine(inputs, method, params, rank=rank, device="cuda", precise=precise)
    assert gpu_report.device.startswith("cuda") and gpu.ranks == cpu.ranks
    for name, module in gpu.modules.items():
        assert module.A.device.type == "cpu" and module.A.dtype == torch.bfloat16
        torch.testing.assert_close(module.delta(), cpu.modules[name].delta(), rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_random_masks_on_cuda_are_seeded(inputs, method):
    first, _ = combine(inputs, method, {"density": 0.5, "seed": 3, "normalize": False}, device="cuda")
    again, _ = combine(inputs, method, {"density": 0.5, "seed": 3, "normalize": False}, device="cuda")
    assert all(torch.equal(first.modules[n].B, again.modules[n].B) for n in first.modules)


@pytest.mark.parametrize("norm", [None, "l1"])
def test_della_on_cuda_matches_the_reference_with_cuda_draws(inputs, norm, device="cuda"):
    """The same DELLA as on the CPU, from the CUDA generator's draws (one block per module here); with a rescale_norm,
    its norms' pass and the mix draw the same numbers (each from a fresh generator)."""
    import combine_reference as ref
    from loraops.ops.combine import module_seed

    params = {"density": 0.5, "epsilon": 0.2, "seed": 3, **({"rescale_norm": norm} if norm else {})}
    result, _ = combine(inputs, "della_linear", params, rank=64, device=device)
    for name, module in result.modules.items():
        want = 0
        for i, (weight, tau) in enumerate(ref.taus(inputs, name)):
            generator = torch.Generator(device).manual_seed(module_seed(3, name, i))
            draws = torch.rand(tau.shape, generator=generator, device=device).cpu()
            sparse = ref.della(tau, 0.5, 0.2, draws, rescale=norm is None)
            want = want + weight * ref.rescaled_masked(tau, sparse, norm)
        torch.testing.assert_close(module.delta(dtype=torch.float64), want, rtol=2e-2, atol=2e-3)


def test_resize_on_cuda_matches_cpu(inputs):
    adapter = inputs[1][0]
    cpu, cpu_report = resize(adapter, dynamic="sv_fro", param=0.9, device="cpu")
    gpu, gpu_report = resize(adapter, dynamic="sv_fro", param=0.9, device="cuda")
    assert gpu.ranks == cpu.ranks
    for name, module in gpu.modules.items():
        torch.testing.assert_close(module.delta(), cpu.modules[name].delta(), rtol=2e-2, atol=2e-3)
