"""VIKDF stage 2 without ranks: the fusion bench step, and the scales of BVIF's loss terms."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


def test_fusion_bench_step_runs_and_counts_flops():
    from mmtrain.bench.vikdf import fusion

    row = fusion(batch=2, text_len=6, iters=1, warm=0, size="tiny", device="cpu")
    assert (
        row["tok_s"] > 0
        and row["tflops"] >= 0
        and row["llm_tokens_per_step"] == 2 * ((9 + 6 + 8) + (9 + 8 + 7))
    )


# -- the scales of BVIF's terms (issue 19, item 1) -------------------------------------------------


def bvif(**losses):
    """A BVIF at the published knowledge width (768 x 32 queries), one IQ-Former layer."""
    from mmtrain.models.bvif import BVIF, BVIFLosses
    from mmtrain.models.iqformer import IQFormer, IQFormerConfig

    iq = IQFormer(IQFormerConfig(width=768, layers=1, heads=12, intermediate=64, num_queries=32))
    return BVIF(iq, d_llm=64, losses=BVIFLosses(**losses))


def test_kl_and_reconstruction_are_per_dimension_like_the_language_loss():
    import torch

    from kernels.reference import gaussian_kl

    torch.manual_seed(0)
    k, states = torch.randn(2, 32, 768), torch.randn(2, 32, 64)
    per_dim = bvif()
    _, kl, mu_p, lv_p = per_dim.latent(k, states, eps=torch.zeros(2, 32, 768))
    mu_q, lv_q = per_dim.posterior_stats(k)
    summed = gaussian_kl(mu_q, lv_q, mu_p, lv_p)  # over the 768 dimensions
    assert float(kl) == pytest.approx(float(summed) / 768, rel=1e-5)
    assert 0.1 < float(kl) < 10  # a cross-entropy's scale, not 768 times it
    # the released reconstruction: the per-element MSE of the prior's mean against K
    assert float(per_dim.reconstruction_loss(k, mu_p, lv_p)) == pytest.approx(
        float(((mu_p - k) ** 2).mean()), rel=1e-5
    )
    per_dim.losses.reduction = "sum"  # the textbook ELBO's sum, 768 times larger
    _, kl_sum, _, _ = per_dim.latent(k, states, eps=torch.zeros(2, 32, 768))
    assert float(kl_sum) == pytest.approx(float(summed), rel=1e-5)


def test_the_gaussian_reconstruction_is_bounded_below_by_the_prior_variance_floor():
    import torch

    model = bvif(reconstruction="gaussian", prior_logvar_min=-2.0)
    with torch.no_grad():
        model.prior.bias[768:] = -100.0  # a prior that claims to be exact
        model.prior.weight.zero_()
    mu_p, lv_p = model.prior_stats(torch.randn(2, 32, 64))
    assert float(lv_p.min()) >= -2.0
    # even with the mean right on K, the NLL per dimension cannot fall below 0.5 x floor
    assert float(model.reconstruction_loss(mu_p, mu_p, lv_p)) >= 0.5 * -2.0 - 1e-6


def test_free_bits_keep_each_kl_element_at_least_that_many_nats():
    import torch

    model = bvif(free_bits=0.25)
    k = torch.randn(2, 32, 768)
    with torch.no_grad():  # a prior equal to the posterior: KL 0 without free bits
        model.prior.weight.zero_()
        model.prior.bias.zero_()
    states = torch.zeros(2, 32, 64)
    mu_p, lv_p = model.prior_stats(states)
    model.posterior_stats = lambda _k: (mu_p, lv_p)  # q = p
    _, kl, _, _ = model.latent(k, states, eps=torch.zeros(2, 32, 768))
    assert float(kl) == pytest.approx(0.25)  # per dimension


def test_the_kl_weight_warms_up_over_the_optimizer_steps_and_resumes():
    from types import SimpleNamespace

    from mmtrain.recipes.vikdf.fuse import VIKDFFuse

    recipe = VIKDFFuse.__new__(VIKDFFuse)
    recipe.cfg = SimpleNamespace(loss_weights={"ce": 1.0, "kl": 0.1}, kl_warmup_steps=10)
    recipe.steps_done = 0
    assert recipe.loss_weight("kl") == 0.0 and recipe.loss_weight("ce") == 1.0
    for _ in range(5):
        recipe.on_step_end()
    assert recipe.loss_weight("kl") == pytest.approx(0.05)
    resumed = VIKDFFuse.__new__(VIKDFFuse)
    resumed.cfg, resumed.steps_done = recipe.cfg, 0
    resumed.load_state_dict(recipe.state_dict())
    assert resumed.loss_weight("kl") == pytest.approx(0.05)
    for _ in range(20):
        resumed.on_step_end()
    assert resumed.loss_weight("kl") == pytest.approx(0.1)


@pytest.mark.parametrize(
    "path",
    sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml")
           if ("vikdf" in p.name or p.parent.name == "vikdf") and "pipelines" not in p.parts),
)  # fmt: skip
def test_todays_vikdf_configs_load_and_name_one_recipe_per_stage(path, monkeypatch):
    """Each published and demo VIKDF config loads as before (recipe.name and recipe.phase
    unchanged) and gives the stage's own recipe class, chosen once from the phase."""
    from mmtrain import config
    from mmtrain.recipes import recipe_class
    from mmtrain.recipes.vikdf import VIKDFDialogue, VIKDFDistill, VIKDFFusion

    monkeypatch.setattr(config, "validate", lambda cfg, pending=(): None)  # paths elsewhere
    cfg = config.load_config(REPO / path)
    recipe = recipe_class(cfg.recipe.name)(cfg.recipe, ctx=None)
    want = {
        ("vikdf_distill", None): VIKDFDistill,
        ("vikdf_fuse", "fusion"): VIKDFFusion,
        ("vikdf_fuse", "dialogue"): VIKDFDialogue,
    }[cfg.recipe.name, getattr(cfg.recipe, "phase", None)]
    assert type(recipe) is want
