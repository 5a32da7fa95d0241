"""Null-space bases, projections and composition against float64 references on random inputs."""

import numpy as np
import pytest
import torch
from torch import nn

from registry import Adapter, Basis
from seqforget.composition import compose, delta
from seqforget.errors import SeqforgetError
from seqforget.projection import Factor, NullSpace, Sketch, _outside, extend_basis, project_out, sketch_directions


def as_basis(u: torch.Tensor | None) -> Basis | None:
    """A basis of columns u (d, k), as the registry hands it over (numpy)."""
    return None if u is None else Basis(u.numpy(), np.zeros(u.shape[1]), ["earlier"] * u.shape[1])


def extend(u: torch.Tensor | None, g: torch.Tensor, threshold: float):
    """(new columns (d, m) as a tensor, energy, captured_before, captured_after)."""
    added, before, after = extend_basis(as_basis(u), g, threshold, "r")
    assert added.owners == ["r"] * added.rank
    return torch.from_numpy(added.columns), torch.from_numpy(added.energy), before, after

D = 16


def orthonormal(gen: torch.Generator, d: int, k: int, dtype=torch.float64) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))
    return q[:, :k].to(dtype)  # (d, k)


def gram(gen: torch.Generator, d: int, n: int, decay: float = 0.75) -> torch.Tensor:
    """R^T R for n inputs R (n, d) whose energy falls off across directions, so thresholds are reachable."""
    r = torch.randn(n, d, generator=gen, dtype=torch.float64) * decay ** torch.arange(d, dtype=torch.float64)
    r = r @ orthonormal(gen, d, d).T  # spread the energy over no particular axes
    return r.T @ r  # (d, d)


def projector(u: torch.Tensor) -> torch.Tensor:
    u = u.double()
    return torch.eye(u.shape[0], dtype=torch.float64) - u @ u.T  # I - U U^T, (d, d)


def share(u: torch.Tensor, g: torch.Tensor) -> float:
    """trace(U^T G U) / trace(G): the energy of G inside span(U)."""
    return (torch.trace(u.T @ g @ u) / torch.trace(g)).item()


# ---- project_out ------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 5, D])
def test_project_out_equals_a_times_the_complement_projector(k):
    gen = torch.Generator().manual_seed(k)
    u = orthonormal(gen, D, k)
    a = torch.randn(4, D, generator=gen, dtype=torch.float64)  # (r, d)
    out = project_out(a, u)
    torch.testing.assert_close(out, a @ projector(u), rtol=0, atol=1e-12)
    if k:
        assert (out @ u).abs().max() < 1e-12
    if k == 0:
        assert torch.equal(out, a)


# ---- extend_basis -----------------------------------------------------------------------------


def minimum_directions(u: torch.Tensor, g: torch.Tensor, threshold: float) -> tuple[int, np.ndarray]:
    """Fewest directions orthogonal to U that lift the captured share to `threshold` (Ky Fan),
    and the shares the best m directions reach, for m = 0 .. d - k."""
    p = projector(u).numpy()
    evals = np.sort(np.linalg.eigvalsh(p @ g.numpy() @ p))[::-1][: D - u.shape[1]]
    reach = share(u, g) + np.concatenate([[0.0], np.cumsum(np.clip(evals, 0, None))]) / np.trace(g.numpy())
    return int(np.argmax(reach >= threshold)), reach


@pytest.mark.parametrize("k", [0, 3, 9])
@pytest.mark.parametrize("gap", [0.5, 0.9, 0.99])
def test_extend_basis_adds_the_fewest_orthonormal_directions_that_reach_the_threshold(k, gap):
    gen = torch.Generator().manual_seed(100 * k + int(gap * 100))
    u = orthonormal(gen, D, k)
    g = gram(gen, D, n=64)
    before = share(u, g)
    threshold = before + gap * (1 - before)  # above what U holds, whatever the draw

    new, energy, before_, after = extend(u if k else None, g, threshold)  # new: (d, m)
    m = new.shape[1]

    assert new.shape == (D, m) and energy.shape == (m,)
    torch.testing.assert_close(new.T @ new, torch.eye(m, dtype=torch.float64), rtol=0, atol=1e-10)
    assert (u.T @ new).norm() < 1e-10
    assert before_ == pytest.approx(before, abs=1e-12)
    union = torch.cat([u, new], dim=1)
    assert after == pytest.approx(share(union, g), abs=1e-10)
    assert after >= threshold
    # energy says what each new column carries, and it all adds up
    torch.testing.assert_close(energy, torch.diag(new.T @ g @ new) / torch.trace(g), rtol=0, atol=1e-10)
    assert energy.sum().item() == pytest.approx(after - before_, abs=1e-10)
    assert bool((energy[:-1] >= energy[1:]).all())  # strongest first

    fewest, reach = minimum_directions(u, g, threshold)
    assert m == fewest
    assert reach[m - 1] < threshold  # one fewer would not do
    assert share(torch.cat([u, new[:, : m - 1]], dim=1), g) < threshold


def test_extend_basis_is_orthogonal_to_a_float32_u_as_the_registry_stores_it():
    # U read back from basis.h5 is float32, orthonormal only to ~1e-7; the new columns must
    # still be orthogonal to that very U, not to the float64 one it was rounded from
    gen = torch.Generator().manual_seed(14)
    d = 64
    for k in (5, 40):
        u = orthonormal(gen, d, k, dtype=torch.float32)
        g = gram(gen, d, n=200, decay=0.9)
        new, _, _, _ = extend(u, g, 0.99)
        assert new.shape[1] > 0
        assert (u.double().T @ new).abs().max() < 1e-12


def test_extend_basis_adds_nothing_when_u_already_holds_the_threshold():
    gen = torch.Generator().manual_seed(7)
    g = gram(gen, D, n=64)
    first, _, _, first_after = extend(None, g, 0.9)
    again, _, again_before, again_after = extend(first, g, 0.9)
    assert again.shape == (D, 0)
    assert again_before == pytest.approx(first_after, abs=1e-10)
    assert again_after == again_before


def test_extend_basis_stops_at_the_rank_of_a_low_rank_gram():
    gen = torch.Generator().manual_seed(8)
    n = 5  # fewer inputs than dimensions: G has rank 5
    r = torch.randn(n, D, generator=gen, dtype=torch.float64)
    new, _, _, after = extend(None, r.T @ r, threshold=1.0)
    assert new.shape == (D, n)
    assert after == pytest.approx(1.0, abs=1e-9)
    # the span of the inputs, exactly: every input is left untouched by nothing but U
    assert (r @ projector(new)).abs().max() < 1e-9


def test_extend_basis_of_a_zero_gram_adds_nothing():
    new, _, before, after = extend(None, torch.zeros(D, D), 0.9)
    assert new.shape == (D, 0)
    assert (before, after) == (1.0, 1.0)


def test_bases_grown_over_many_requests_stay_orthonormal():
    gen = torch.Generator().manual_seed(9)
    u = None
    for _ in range(6):
        new, _, _, _ = extend(u, gram(gen, D, n=32, decay=0.9), 0.8)
        u = new if u is None else torch.cat([u, new], dim=1)
    k = u.shape[1]
    assert 0 < k <= D
    torch.testing.assert_close(u.T @ u, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-10)


# ---- NullSpace ----------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 7, D - 1])
def test_what_u_does_not_capture_is_p_g_p_without_forming_p(k):
    gen = torch.Generator().manual_seed(300 + k)
    u = orthonormal(gen, D, k)
    r = torch.randn(3 * D, D, generator=gen, dtype=torch.float64)
    g = r.T @ r  # (D, D) a Gram matrix
    p = projector(u)  # the d x d matrix the engine never forms
    torch.testing.assert_close(_outside(g, u, g @ u), p @ g @ p, rtol=0, atol=1e-9 * g.abs().max().item())


def sketched(r: torch.Tensor, rank: int, batch: int = 7) -> Sketch:
    """A Sketch of the rows of r, fed in batches of `batch` rows, as forward passes feed it."""
    sketch = Sketch(r.shape[1], rank)
    for i in range(0, len(r), batch):
        sketch.add(r[i:i + batch])
    return sketch


@pytest.mark.parametrize("rank", [3, 6, 10])
def test_a_sketch_never_overstates_and_misses_little_more_than_the_tail(rank):
    """Nystrom's guarantees: 0 <= G_hat <= G in every direction; the trace it misses is within
    (1 + j / (s - j - 1)) of the tail beyond G's top j directions (in expectation; here with a
    margin of 2 for one draw); the total energy is exact."""
    gen = torch.Generator().manual_seed(400 + rank)
    r = torch.randn(20 * D, D, generator=gen, dtype=torch.float64) * 0.8 ** torch.arange(D, dtype=torch.float64)
    r = r @ orthonormal(gen, D, D).T
    g = r.T @ r
    sketch = sketched(r, rank)
    f = sketch.factor()
    assert f.shape[1] <= rank
    scale = torch.trace(g).item()
    assert torch.linalg.eigvalsh(f @ f.T).min().item() >= -1e-12 * scale
    assert torch.linalg.eigvalsh(g - f @ f.T).min().item() >= -1e-10 * scale
    tail = torch.linalg.eigvalsh(g).flip(0)
    j = rank // 2
    missed = torch.trace(g - f @ f.T).item()
    assert 0 < missed <= 2 * (1 + j / max(rank - j - 1, 1)) * tail[j:].sum().item()
    assert sketch.total == pytest.approx(scale, rel=1e-12)


def test_a_sketch_of_inputs_of_rank_at_most_s_is_exact_and_grows_the_basis_the_gram_grows():
    gen = torch.Generator().manual_seed(410)
    r = torch.randn(200, 5, generator=gen, dtype=torch.float64) @ torch.randn(5, D, generator=gen, dtype=torch.float64)
    sketch, g = sketched(r, rank=6), r.T @ r
    f = sketch.factor()
    torch.testing.assert_close(f @ f.T, g, rtol=0, atol=1e-9 * g.abs().max().item())
    u = orthonormal(gen, D, 3)
    for basis in (None, u):
        new_s, energy_s, before_s, after_s = extend(basis, sketch, 0.999)
        new_g, energy_g, before_g, after_g = extend(basis, g, 0.999)
        assert new_s.shape == new_g.shape
        torch.testing.assert_close(new_s @ new_s.T, new_g @ new_g.T, rtol=0, atol=1e-8)  # the same span
        torch.testing.assert_close(energy_s, energy_g, rtol=1e-9, atol=1e-12)
        assert (before_s, after_s) == pytest.approx((before_g, after_g), rel=1e-9)


def test_a_sketch_reaches_the_threshold_when_its_directions_hold_the_energy():
    """Inputs of full rank with fast-decaying energy, sketched at a rank below their width: the
    basis from the sketch captures the threshold of the inputs' true energy."""
    gen = torch.Generator().manual_seed(420)
    r = torch.randn(30 * D, D, generator=gen, dtype=torch.float64) * 0.5 ** torch.arange(D, dtype=torch.float64)
    r = r @ orthonormal(gen, D, D).T
    g = r.T @ r
    new, _, _, after = extend(None, sketched(r, rank=8), 0.99)
    assert after >= 0.99
    true = torch.trace(new.T @ g @ new).item() / torch.trace(g).item()
    assert true >= after - 1e-9  # what the sketch reports is a lower bound of what the columns hold


def test_sketches_of_one_width_share_their_test_matrix_and_agree_with_one_drawn_alone():
    gen = torch.Generator().manual_seed(430)
    r = torch.randn(100, D, generator=gen, dtype=torch.float64)
    omega = sketch_directions(D, 4)
    shared, alone = Sketch(D, 4, omega), Sketch(D, 4)
    shared.add(r)
    alone.add(r)
    assert shared.omega is omega
    torch.testing.assert_close(shared.factor(), alone.factor(), rtol=0, atol=0)  # the same seeded draw


def test_bases_given_as_a_factor_grow_a_basis_as_their_weighted_gram_does():
    """Other bases' columns, weighted by the energy each carries (a Factor), extend a basis as the
    Gram matrix they stand for does: the way earlier requests' forget keys join a null space."""
    gen = torch.Generator().manual_seed(440)
    parts = [Basis(orthonormal(gen, D, k).numpy(), np.linspace(0.3, 0.01, k), ["r"] * k) for k in (3, 5)]
    factor = Factor.of(parts)
    g = sum(torch.from_numpy(p.columns) @ torch.diag(torch.from_numpy(p.energy)) @ torch.from_numpy(p.columns).T
            for p in parts)
    assert factor.total == pytest.approx(sum(p.energy.sum() for p in parts), rel=1e-12)
    u = orthonormal(gen, D, 4)
    for basis in (None, u):
        new_f, energy_f, before_f, after_f = extend(basis, factor, 0.999)
        new_g, energy_g, before_g, after_g = extend(basis, g, 0.999)
        torch.testing.assert_close(new_f @ new_f.T, new_g @ new_g.T, rtol=0, atol=1e-8)  # the same span
        torch.testing.assert_close(energy_f, energy_g, rtol=1e-9, atol=1e-12)
        assert (before_f, after_f) == pytest.approx((before_g, after_g), rel=1e-9)


def test_an_empty_sketch_adds_nothing():
    added, before, after = extend_basis(None, Sketch(D, 4), 0.9, "r")
    assert added.rank == 0 and (before, after) == (1.0, 1.0)


@pytest.mark.parametrize("k", [0, 3, D // 2, D // 2 + 1, 13, D])
def test_null_space_projects_the_same_in_both_representations(k):
    gen = torch.Generator().manual_seed(200 + k)
    u = orthonormal(gen, D, k)
    a = torch.randn(4, D, generator=gen, dtype=torch.float64)
    ns = NullSpace(as_basis(u))

    assert ns.complement == (k > D // 2)
    assert ns.basis.shape == ((D, D - k) if ns.complement else (D, k))
    out = ns.project(a)
    torch.testing.assert_close(out, a @ projector(u), rtol=0, atol=1e-10)
    torch.testing.assert_close(out, project_out(a, u), rtol=0, atol=1e-10)
    if k:
        assert ((out @ u).norm() / a.norm()).item() < 1e-10


@pytest.mark.parametrize("k", [5, 50])
def test_null_space_in_float32_keeps_a_u_below_1e_6(k):
    d = 64
    gen = torch.Generator().manual_seed(300 + k)
    u = orthonormal(gen, d, k, dtype=torch.float32)
    a = torch.randn(8, d, generator=gen)
    ns = NullSpace(as_basis(u))
    assert ns.complement == (k > d // 2)
    out = ns.project(a)
    assert out.dtype == torch.float32
    assert ((out @ u).norm() / a.norm()).item() < 1e-6
    torch.testing.assert_close(out.double(), a.double() @ projector(u), rtol=0, atol=1e-5)


# ---- composition ----------------------------------------------------------------------------------


class TwoLayers(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.up = nn.Linear(D, 2 * D, dtype=dtype)
        self.act = nn.ReLU()
        self.down = nn.Linear(2 * D, D, dtype=dtype)


def adapter(gen: torch.Generator, sign: int, alpha: float, modules: dict[str, tuple[int, int]]) -> Adapter:
    """A LoRA of rank 4 with {module: (d_in, d_out)}; a negative sign is stored in B, as the engine does."""
    r = 4
    weights = {
        name: {"A": (0.3 * torch.randn(r, d_in, generator=gen)).numpy(),
               "B": (sign * 0.3 * torch.randn(d_out, r, generator=gen)).numpy()}
        for name, (d_in, d_out) in modules.items()
    }
    return Adapter("lora", weights, {"r": r, "lora_alpha": alpha})


def reference(model: nn.Module, adapters: list[Adapter]) -> dict[str, np.ndarray]:
    """W + sum_i (alpha_i / r_i) B_i A_i for every linear layer, in float64 numpy."""
    out = {name: layer.weight.detach().double().numpy().copy() for name, layer in model.named_modules()
           if isinstance(layer, nn.Linear)}
    for ad in adapters:
        for name, parts in ad.weights.items():
            out[name] += ad.config["lora_alpha"] / ad.config["r"] * (parts["B"].astype(np.float64) @ parts["A"].astype(np.float64))
    return out


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_compose_adds_each_signed_scaled_product_and_removes_it_again(dtype, tol):
    gen = torch.Generator().manual_seed(10)
    model = TwoLayers(dtype)
    adapters = [
        adapter(gen, +1, 8.0, {"up": (D, 2 * D), "down": (2 * D, D)}),
        adapter(gen, -1, 2.0, {"up": (D, 2 * D)}),
    ]
    original = weights(model)
    expected = reference(model, adapters)

    compose(model, adapters)
    for name in ("up", "down"):
        w = getattr(model, name).weight.detach().double().numpy()
        np.testing.assert_allclose(w, expected[name], rtol=tol, atol=tol)
        assert np.abs(w - original[f"{name}.weight"].double().numpy()).max() > 0.1  # a real change
    for name in ("up.bias", "down.bias"):
        assert torch.equal(model.state_dict()[name], original[name])

    compose(model, adapters, direction=-1)
    for name, value in weights(model).items():
        torch.testing.assert_close(value, original[name], rtol=0, atol=1e-6)


def test_a_negative_sign_subtracts_what_a_positive_sign_adds():
    gen = torch.Generator().manual_seed(11)
    plus = adapter(gen, +1, 8.0, {"up": (D, 2 * D)})
    minus = Adapter("lora", {"up": {"A": plus.weights["up"]["A"], "B": -plus.weights["up"]["B"]}}, plus.config)
    torch.testing.assert_close(delta(minus, "up"), -delta(plus, "up"), rtol=0, atol=0)
    model = TwoLayers(torch.float64)
    original = weights(model)
    compose(model, [plus, minus])
    torch.testing.assert_close(model.up.weight.detach(), original["up.weight"], rtol=0, atol=1e-12)


def test_a_projected_adapter_leaves_retained_inputs_untouched():
    gen = torch.Generator().manual_seed(12)
    model = TwoLayers(torch.float64)
    u, _, _, _ = extend(None, gram(gen, D, n=64), 0.9)  # (d, k) retained directions of "up"
    ad = adapter(gen, +1, 8.0, {"up": (D, 2 * D)})
    a = torch.from_numpy(ad.weights["up"]["A"])
    ad.weights["up"]["A"] = NullSpace(as_basis(u)).project(a.double()).float().numpy()
    x = torch.randn(8, u.shape[1], generator=gen, dtype=torch.float64) @ u.T  # retained inputs (n, d)
    y = torch.randn(8, D, generator=gen, dtype=torch.float64)  # anything else
    before_x, before_y = model.up(x).detach(), model.up(y).detach()

    compose(model, [ad])
    torch.testing.assert_close(model.up(x).detach(), before_x, rtol=0, atol=1e-6)
    assert (model.up(y).detach() - before_y).abs().max() > 0.1


def test_sine_and_masked_terms_compose_with_lora_in_any_order_and_come_off_again():
    """sin(dW) and a sparse delta are terms of the same float64 sum as a LoRA's: the live
    weight is the same in every order, and removing all of them gives the base back."""
    gen = torch.Generator().manual_seed(14)
    lora = adapter(gen, +1, 8.0, {"up": (D, 2 * D), "down": (2 * D, D)})
    d_w = 3.0 * torch.randn(2 * D, D, generator=gen)  # large enough that sin is far from linear
    sine = Adapter("sine", {"up": {"dW": d_w.numpy()}}, {})
    indices = torch.cat([torch.randperm(2 * D * D, generator=gen)[:9], torch.tensor([5, 5])])  # a repeated index adds
    values = torch.randn(11, generator=gen)
    masked = Adapter("masked", {"up": {"indices": indices.numpy(), "values": values.numpy()}}, {"shapes": {"up": [2 * D, D]}})
    model = TwoLayers(torch.float64)
    original = weights(model)
    expected = reference(model, [lora])
    expected["up"] += np.sin(d_w.double().numpy())
    np.add.at(expected["up"].reshape(-1), indices.numpy(), values.double().numpy())

    for order in ([lora, sine, masked], [masked, lora, sine], [sine, masked, lora]):  # three terms on "up"
        compose(model, order)
        for name in ("up", "down"):
            np.testing.assert_allclose(getattr(model, name).weight.detach().numpy(), expected[name], rtol=0, atol=1e-12)
        compose(model, order, direction=-1)
        for name, value in weights(model).items():
            torch.testing.assert_close(value, original[name], rtol=0, atol=1e-12)
    untouched = np.ones(2 * D * D, dtype=bool)
    untouched[indices.numpy()] = False
    assert np.abs(delta(masked, "up").numpy().reshape(-1)[untouched]).max() == 0  # sparse: nothing else moves


@pytest.mark.parametrize("bad", ["out of range", "negative", "lengths", "no shape", "wrong shape"])
def test_a_masked_or_sine_update_that_does_not_fit_its_layer_is_refused(bad):
    model = TwoLayers(torch.float64)
    original = weights(model)
    indices, values, shapes = np.array([0, 3]), np.array([1.0, 2.0], dtype=np.float32), {"up": [2 * D, D]}
    if bad == "out of range":
        indices = np.array([0, 2 * D * D])
    elif bad == "negative":
        indices = np.array([-1, 3])
    elif bad == "lengths":
        values = values[:1]
    elif bad == "no shape":
        shapes = {}
    ad = Adapter("masked", {"up": {"indices": indices, "values": values}}, {"shapes": shapes})
    if bad == "wrong shape":
        ad = Adapter("sine", {"up": {"dW": np.ones((1, D), dtype=np.float32)}}, {})  # would broadcast over every row
    with pytest.raises(SeqforgetError, match="up"):
        compose(model, [ad])
    for name, value in weights(model).items():
        assert torch.equal(value, original[name])


@pytest.mark.parametrize("target", ["act", "missing"])
def test_compose_refuses_a_target_that_is_not_a_linear_layer(target):
    gen = torch.Generator().manual_seed(13)
    model = TwoLayers()
    original = weights(model)
    with pytest.raises(SeqforgetError, match=target):
        compose(model, [adapter(gen, +1, 4.0, {target: (D, D)})])
    for name, value in weights(model).items():
        assert torch.equal(value, original[name])


@pytest.mark.parametrize("off", [[0], [0, 1, 2, 3], [4], [1, 4]], ids=["one lora", "four loras", "a sine", "lora and sine"])
def test_terms_switched_off_answer_as_the_model_composed_without_them(off):
    """EarlierOff subtracts the switched-off terms from each layer's output, as stacked factors
    (few) or one dense delta (many, or a dense kind): both must equal composing without them."""
    from seqforget.live import EarlierOff

    class Net(TwoLayers):
        def forward(self, x):
            return self.down(self.act(self.up(x)))

    gen = torch.Generator().manual_seed(15)
    terms = [adapter(gen, +1, 8.0, {"up": (D, 2 * D), "down": (2 * D, D)}) for _ in range(4)]
    terms.append(Adapter("sine", {"up": {"dW": (0.5 * torch.randn(2 * D, D, generator=gen)).numpy()}}, {}))
    x = torch.randn(5, D, generator=gen, dtype=torch.float64)
    live, without = Net(torch.float64), Net(torch.float64)
    without.load_state_dict(live.state_dict())
    compose(live, terms)
    compose(without, [t for i, t in enumerate(terms) if i not in off])
    expected, everything = without(x).detach(), live(x).detach()

    switches = EarlierOff(live, {f"t{i}": t for i, t in enumerate(terms)}, p=0.5, seed=0)
    switches.switch_off(f"t{i}" for i in off)
    torch.testing.assert_close(live(x).detach(), expected, rtol=0, atol=1e-5)  # the factors are float32
    switches.all_on()
    assert torch.equal(live(x).detach(), everything)
    switches.switch_off(f"t{i}" for i in off)
    switches.remove()
    assert torch.equal(live(x).detach(), everything)
