"""pyengine.model.sampling against references written here: the top-k / top-p masks on fixed
logits (ties, k beyond V, p of 1 and tiny), greedy rows as torch.argmax, the counter-based noise
(a splitmix64 written with Python integers), batch independence, a constant launch count, and a
chi-square test of the draws' frequencies against the distribution the rules define."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pyengine.model.sampling import keep_mask, pack_sampling, sample, splitmix64, uniforms

FALSE_ALARM = 1e-4
"""The chi-square tests' significance: a correct sampler fails one with this probability over
random seed sets (here the seeds are fixed, so the outcome is fixed too)."""
MASK64 = (1 << 64) - 1


def splitmix64_reference(x: int) -> int:
    """splitmix64's output function on unsigned Python integers (the published constants)."""
    z = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def as_signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def keep_reference(z: list[float], k: int, p: float) -> set[int]:
    """The ids the module docstring's rules keep, in float64 with plain Python."""
    order = sorted(range(len(z)), key=lambda i: (-z[i], i))  # descending, ties: lower id first
    if 0 < k < len(z):
        order = order[:k]
    m = max(z[i] for i in order)
    weights = [math.exp(z[i] - m) for i in order]
    total = sum(weights)
    kept, before = [], 0.0
    for i, w in zip(order, weights):
        if kept and before >= p and p < 1.0:
            break
        kept.append(i)
        before += w / total
    return set(kept)


def settings(n, temperature=1.0, top_k=0, top_p=1.0, seed=0, index=0):
    full = lambda v, dtype: torch.full((n,), v, dtype=dtype)  # noqa: E731
    return (full(temperature, torch.float32), full(top_k, torch.int64), full(top_p, torch.float32),
            full(seed, torch.int64), full(index, torch.int64))


# ---- the noise -------------------------------------------------------------------------------------
@pytest.mark.parametrize("x", [0, 1, 12345, 2**62 + 7, 2**64 - 1, 0x9E3779B97F4A7C15])
def test_splitmix64_matches_the_published_function(x):
    got = splitmix64(torch.tensor([as_signed(x)], dtype=torch.int64)).item()
    assert got & MASK64 == splitmix64_reference(x)


def test_uniforms_are_inside_the_open_interval_and_depend_only_on_seed_index_and_id():
    seed = torch.tensor([0, 1, 2**62, 0], dtype=torch.int64)
    index = torch.tensor([0, 0, 5, 1], dtype=torch.int64)
    u = uniforms(seed, index, 97)
    assert u.shape == (4, 97) and bool((u > 0).all()) and bool((u < 1).all())
    assert not torch.equal(u[0], u[3])  # the index moves the noise
    again = uniforms(seed[2:3], index[2:3], 97)  # the same row alone
    assert torch.equal(again[0], u[2])
    wider = uniforms(seed[:1], index[:1], 150)  # a larger vocabulary: the same noise on shared ids
    assert torch.equal(wider[0, :97], u[0])


def test_uniforms_look_uniform():
    u = uniforms(torch.arange(64), torch.zeros(64, dtype=torch.int64), 1000).flatten()
    counts = torch.histc(u, bins=10, min=0, max=1)
    expected = u.numel() / 10
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert _p_value(chi2, 9) > FALSE_ALARM


# ---- the masks -------------------------------------------------------------------------------------
MASK_CASES = [
    # (logits, top_k, top_p, what it hits)
    ([1.0, 3.0, 3.0, 2.0, 3.0], 2, 1.0, "a three-way tie across the top-k boundary: the lower ids"),
    ([1.0, 3.0, 3.0, 2.0, 3.0], 0, 1.0, "k 0: every id"),
    ([0.5, -1.0, 2.0], 7, 1.0, "k beyond V: every id"),
    ([0.5, -1.0, 2.0], 3, 1.0, "k equal to V"),
    ([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 0, 1e-9, "p tiny: the first id only"),
    ([math.log(0.5), math.log(0.3), math.log(0.2)], 0, 0.49, "p below the first id's mass"),
    ([math.log(0.5), math.log(0.3), math.log(0.2)], 0, 0.51, "p just past it: two ids"),
    ([math.log(0.5), math.log(0.3), math.log(0.2)], 0, 0.79, "p short of two ids' mass: two ids"),
    ([math.log(0.5), math.log(0.3), math.log(0.2)], 0, 0.81, "p past two ids' mass: all three"),
    ([math.log(0.2), math.log(0.5), math.log(0.3)], 2, 0.6, "top-k first, then top-p over the renormalised two"),
    ([2.0, 2.0, 2.0, 2.0], 0, 0.3, "all tied: p over equal masses, lower ids first"),
    ([2.0, 2.0, 2.0, 2.0], 0, 0.5, "p reached exactly (masses 1/4, exact in fp32): the prefix that reaches it"),
    ([-1e4, 0.0, 1e4], 0, 0.999999, "one id holds all the mass"),
]


@pytest.mark.parametrize("logits,top_k,top_p,why", MASK_CASES, ids=[c[3] for c in MASK_CASES])
def test_keep_mask_matches_the_reference(logits, top_k, top_p, why):
    z = torch.tensor([logits], dtype=torch.float32)
    got = keep_mask(z, torch.tensor([top_k]), torch.tensor([top_p]))
    want = keep_reference(logits, top_k, top_p)
    assert set(torch.nonzero(got[0]).flatten().tolist()) == want, why


def test_keep_mask_rows_are_independent():
    torch.manual_seed(0)
    z = torch.randn(9, 31)
    k = torch.tensor([0, 1, 2, 5, 31, 40, 3, 0, 7])
    p = torch.tensor([1.0, 0.5, 0.9, 0.3, 0.99, 0.7, 1.0, 1e-6, 0.95])
    got = keep_mask(z, k, p)
    for r in range(9):
        want = keep_reference(z[r].tolist(), int(k[r]), float(p[r]))
        assert set(torch.nonzero(got[r]).flatten().tolist()) == want, r


# ---- greedy and the draw -------------------------------------------------------------------------------
def test_greedy_rows_are_the_argmax_ties_to_the_lower_id():
    logits = torch.tensor([[0.0, 5.0, 5.0, 1.0], [7.0, 7.0, 7.0, 7.0], [-3.0, -2.0, -9.0, -2.5]])
    got = sample(logits, *settings(3, temperature=0.0, top_k=1, top_p=0.1, seed=9))
    assert got.tolist() == [1, 0, 1]
    assert got.dtype == torch.int64


def test_greedy_ignores_noise_and_masks_whatever_the_batch():
    torch.manual_seed(1)
    logits = torch.randn(17, 53, dtype=torch.float16)
    temperature = torch.tensor([0.0, 0.8] * 8 + [0.0])
    t, k, p, s, i = settings(17, top_k=3, top_p=0.5, seed=4)
    got = sample(logits, temperature, k, p, s, i)
    greedy = temperature == 0
    assert torch.equal(got[greedy], logits.float().argmax(-1)[greedy])


def test_draws_stay_inside_the_mask():
    torch.manual_seed(2)
    logits = torch.randn(1, 40).expand(300, 40).contiguous()
    t, k, p, s, i = settings(300, temperature=1.5, top_k=6, top_p=0.8)
    s = torch.arange(300)
    got = sample(logits, t, k, p, s, i)
    allowed = keep_reference((logits[0] / 1.5).tolist(), 6, 0.8)
    assert set(got.tolist()) <= allowed
    assert len(set(got.tolist())) > 1  # not a constant: the seeds move the draw


def test_the_same_request_draws_the_same_id_alone_or_in_a_batch_of_33_others():
    torch.manual_seed(3)
    vocab = 61
    logits = torch.randn(34, vocab)
    temperature = torch.rand(34) * 1.5
    temperature[5] = 0.0  # a greedy neighbour
    top_k = torch.randint(0, vocab + 5, (34,))
    top_p = torch.rand(34) * 0.9 + 0.1
    seed = torch.randint(0, 2**62, (34,))
    index = torch.randint(0, 1000, (34,))
    batch = sample(logits, temperature, top_k, top_p, seed, index)
    for r in range(34):
        alone = sample(logits[r:r + 1], temperature[r:r + 1], top_k[r:r + 1], top_p[r:r + 1],
                       seed[r:r + 1], index[r:r + 1])
        assert alone.item() == batch[r].item(), r
    perm = torch.randperm(34)  # and in another order
    shuffled = sample(logits[perm], temperature[perm], top_k[perm], top_p[perm], seed[perm], index[perm])
    assert torch.equal(shuffled, batch[perm])


def test_seed_and_index_make_the_draw():
    logits = torch.zeros(200, 50)  # uniform: every id equally likely
    t, k, p, s, i = settings(200)
    by_seed = sample(logits, t, k, p, torch.arange(200), i)
    assert torch.equal(by_seed, sample(logits, t, k, p, torch.arange(200), i))  # reproducible
    by_index = sample(logits, t, k, p, s, torch.arange(200))
    assert len(set(by_seed.tolist())) > 25 and len(set(by_index.tolist())) > 25


# ---- the distribution --------------------------------------------------------------------------------------
def _p_value(chi2: float, dof: int) -> float:
    """P(X >= chi2) for X ~ chi-square(dof): the regularised upper incomplete gamma."""
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(chi2 / 2, dtype=torch.float64)))


def reference_distribution(logits: list[float], temperature: float, top_k: int, top_p: float) -> list[float]:
    z = [x / temperature for x in logits]
    kept = keep_reference(z, top_k, top_p)
    m = max(z[i] for i in kept)
    w = [math.exp(z[i] - m) if i in kept else 0.0 for i in range(len(z))]
    return [x / sum(w) for x in w]


def chi_square(counts: list[int], probs: list[float]) -> tuple[float, int, int]:
    """(statistic, degrees of freedom, draws outside the support)."""
    n = sum(counts)
    support = [i for i, q in enumerate(probs) if q > 0]
    stat = sum((counts[i] - n * probs[i]) ** 2 / (n * probs[i]) for i in support)
    outside = sum(c for i, c in enumerate(counts) if probs[i] == 0)
    return stat, len(support) - 1, outside


DRAWS = 6000
LOGITS = [1.2, 0.3, -0.4, 2.0, 0.9, -1.5, 0.0, 1.7, -3.0]


def draw_counts(temperature: float, top_k: int, top_p: float) -> list[int]:
    logits = torch.tensor(LOGITS).expand(DRAWS, len(LOGITS)).contiguous()
    t, k, p, _, i = settings(DRAWS, temperature, top_k, top_p)
    ids = sample(logits, t, k, p, torch.arange(DRAWS) * 7919 + 13, i)
    return torch.bincount(ids, minlength=len(LOGITS)).tolist()


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (0.7, 0, 0.9),   # temperature + top-p
    (1.3, 5, 1.0),   # temperature + top-k
    (1.0, 0, 1.0),   # plain softmax
])
def test_draw_frequencies_match_the_reference_distribution(temperature, top_k, top_p):
    counts = draw_counts(temperature, top_k, top_p)
    stat, dof, outside = chi_square(counts, reference_distribution(LOGITS, temperature, top_k, top_p))
    assert outside == 0
    assert _p_value(stat, dof) > FALSE_ALARM, (counts, stat)


def test_the_frequency_test_fails_for_a_wrong_temperature():
    counts = draw_counts(0.7, 0, 0.9)
    stat, dof, outside = chi_square(counts, reference_distribution(LOGITS, 1.0, 0, 0.9))
    assert outside == 0 and _p_value(stat, dof) < FALSE_ALARM  # the test has the power to tell


# ---- cost: launches and transfers ------------------------------------------------------------------------------
class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _ops(n: int, greedy_rows: int) -> int:
    logits = torch.randn(n, 23)
    t, k, p, s, i = settings(n, temperature=0.9, top_k=4, top_p=0.8)
    t[:greedy_rows] = 0.0
    with CountOps() as counter:
        sample(logits, t, k, p, s, i)
    return counter.ops


def test_launch_count_is_the_same_whatever_the_batch():
    counts = {_ops(1, 0), _ops(1, 1), _ops(37, 0), _ops(37, 12), _ops(64, 64)}
    assert len(counts) == 1, counts


def test_pack_sampling_is_one_block_and_round_trips():
    class S:
        def __init__(self, temperature, top_k, top_p, seed):
            self.temperature, self.top_k, self.top_p, self.seed = temperature, top_k, top_p, seed

    rows = [(S(0.0, 0, 1.0, 0), 0), (S(0.7, 40, 0.95, 2**63 - 1), 17), (S(1e-3, 1, 1e-6, 5), 2**40)]
    t, k, p, s, i = pack_sampling(rows, "cpu")
    assert t.dtype == p.dtype == torch.float32 and k.dtype == s.dtype == i.dtype == torch.int64
    assert t.tolist() == pytest.approx([0.0, 0.7, 1e-3]) and p.tolist() == pytest.approx([1.0, 0.95, 1e-6])
    assert k.tolist() == [0, 40, 1] and s.tolist() == [0, 2**63 - 1, 5] and i.tolist() == [0, 17, 2**40]
    empty = pack_sampling([], "cpu")
    assert all(x.numel() == 0 for x in empty)


@pytest.mark.gpu
def test_sampling_on_the_gpu_waits_on_nothing_and_matches_the_cpu():
    torch.manual_seed(5)
    logits = torch.randn(33, 1000)
    t, k, p, s, i = settings(33, temperature=0.8, top_k=50, top_p=0.9)
    s = torch.arange(33) * 31
    want = sample(logits, t, k, p, s, i)
    args = [x.cuda() for x in (logits, t, k, p, s, i)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = sample(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got.cpu(), want)


def test_sample_rows_draws_each_sampled_work_by_its_own_settings_and_the_rest_greedily():
    from pyengine.execute.step_plan import Sampling, SeqWork, StepPlan
    from pyengine.model.sampling import sample_rows

    torch.manual_seed(6)
    logits = torch.randn(6, 37)  # 4 works at rows 3, 0, 5, 1; rows 2 and 4 are padding
    works = (SeqWork(0, (1,), 4, True, Sampling(0.9, 5, 0.9, 11), 3),
             SeqWork(1, (2, 3), 0, False, Sampling(0.9, 0, 1.0, 12), 0),  # a chunk that draws nothing
             SeqWork(2, (4,), 9, True, Sampling(), 7),
             SeqWork(3, (5,), 2, True, Sampling(1.3, 0, 0.5, 2**62), 1))
    rows = [3, 0, 5, 1]
    got = sample_rows(logits, StepPlan(works), rows)
    for w, row in zip(works, rows):
        s = w.sampling if w.sample else Sampling()
        alone = sample(logits[row:row + 1], *settings(1, s.temperature, s.top_k, s.top_p, s.seed, w.index))
        assert got[row].item() == alone.item()
    assert got[2].item() == logits[2].argmax().item() and got[4].item() == logits[4].argmax().item()


@pytest.mark.parametrize("temperature", [1e-44, 1e-38, 1e-30])
def test_a_tiny_temperature_draws_the_argmax_not_an_overflowed_tie(temperature):
    # logits / t overflowed fp32: 10/1e-38 and 20/1e-38 were both +inf (a tie the lower id won), and
    # at the denormal 1e-44 every row became NaN/inf and the draw was id 0 whatever the logits
    logits = torch.tensor([[10.0, 20.0, 0.0, -5.0], [3.0, -1.0, 7.5, 7.0], [0.0, 0.0, 0.0, 0.1]])
    got = sample(logits, *settings(3, temperature=temperature, seed=5))
    assert got.tolist() == [1, 2, 3]
