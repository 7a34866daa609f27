"""Block-magnitude pruning: BlockedLinear.prune and performer.prune (layer, global and LAMP scope),
masks on torch.nn.utils.prune's reparametrization, optimizers, deepcopy, save/load, bad input."""
import copy
import io

import pytest
import torch
from torch import nn

import performer
from performer.nn import BlockedLinear
from performer.nn.pruning import block_scores, lamp_scores


def layer(n_in=70, n_out=50, seed=0, **kw):
    torch.manual_seed(seed)
    return BlockedLinear(n_in, n_out, **kw)


def blocks_kept(mask, block):
    """(row blocks, col blocks) bool: each block entirely kept or entirely removed."""
    rows, cols = block
    N, K = mask.shape
    grid = torch.nn.functional.pad(mask.float(), (0, -K % cols, 0, -N % rows), value=-1)
    grid = grid.unflatten(0, (-1, rows)).unflatten(2, (-1, cols)).transpose(1, 2).flatten(2)
    real = grid >= 0
    kept = (grid == 1) & real
    assert torch.equal(kept.any(-1), (kept | ~real).all(-1)), "a block is partly kept"
    return kept.any(-1)


@pytest.mark.parametrize("criterion", ["l1", "l2"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_prune_removes_the_weakest_whole_blocks(sparsity, criterion):
    lin = layer()
    w = lin.weight.detach().clone()
    lin.prune(sparsity, block=(16, 8), criterion=criterion)
    assert isinstance(lin.weight_orig, nn.Parameter) and torch.equal(lin.weight_orig.detach(), w)
    kept = blocks_kept(lin.weight_mask, (16, 8))
    n_blocks = kept.numel()
    assert (~kept).sum().item() == round(sparsity * n_blocks)
    scores = block_scores(w, (16, 8), criterion)
    if 0 < sparsity:
        assert scores[~kept].max() <= scores[kept].min()
    torch.testing.assert_close(lin.weight, w * lin.weight_mask, atol=0, rtol=0)
    x = torch.randn(3, 70)
    torch.testing.assert_close(lin(x), x @ (w * lin.weight_mask).T + lin.bias)


def test_scores_count_edge_blocks_by_their_own_size():
    w = torch.ones(20, 10)
    scores = block_scores(w, (16, 8), "l1")
    assert scores.shape == (2, 2)
    torch.testing.assert_close(scores, torch.ones(2, 2))


def test_raising_sparsity_keeps_pruned_blocks_pruned_and_optimizers_train():
    lin = layer()
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    lin.prune(0.5, block=(16, 8))
    first = lin.weight_mask.clone()
    x = torch.randn(8, 70)
    lin(x).square().sum().backward()
    opt.step()
    assert lin.weight_orig.grad is not None
    assert (lin.weight_orig.grad[first == 0] == 0).all()  # masked weights get no gradient
    lin.prune(0.75, block=(16, 8))
    assert ((lin.weight_mask <= first)).all()
    assert round(1 - lin.weight_mask.mean().item(), 1) >= 0.7


def test_global_scope_ranks_blocks_across_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    with torch.no_grad():
        model[2].weight.mul_(10)  # the second layer's blocks all outscore the first's
    performer.prune(model, 0.5, block=(16, 16), scope="global")
    assert model[0].weight_mask.mean().item() < 0.5 and model[2].weight_mask.mean().item() == 1.0
    total = model[0].weight_mask.numel() + model[2].weight_mask.numel()
    removed = (model[0].weight_mask == 0).sum() + (model[2].weight_mask == 0).sum()
    assert abs(removed.item() / total - 0.5) < 0.02
    performer.prune(model, 0.5, block=(16, 16), scope="layer")
    assert model[2].weight_mask.mean().item() == 0.5


def test_lamp_scores():
    """s_u^2 / (sum of s_v^2 over the blocks scoring at least s_u); each layer's best block scores 1."""
    scores = torch.tensor([[3.0, 1.0], [0.0, 2.0]])
    expected = torch.tensor([[9 / 9, 1 / 14], [0.0, 4 / 13]], dtype=torch.float64)
    torch.testing.assert_close(lamp_scores(scores), expected)
    assert lamp_scores(torch.zeros(2, 3)).eq(0).all()
    torch.testing.assert_close(lamp_scores(100 * scores), expected)   # scale-free


def test_lamp_scope_compares_layers_of_any_scale():
    """Global ranking empties a layer whose weights are small; LAMP's layer-adaptive scores keep
    every layer's strongest blocks and still remove the sparsity across the model, and pruned blocks
    stay pruned as the sparsity rises."""
    def model():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
        with torch.no_grad():
            m[0].weight.mul_(0.01)
        return m
    with pytest.warns(UserWarning, match="performer.prune removed every block of 0 .* scope='lamp'"):
        plain = performer.prune(model(), 0.5, block=(16, 16), scope="global")
    assert plain[0].weight_mask.sum() == 0
    lamp = performer.prune(model(), 0.5, block=(16, 16), scope="lamp")
    kept = [m.weight_mask.mean().item() for m in (lamp[0], lamp[2])]
    assert all(0.25 <= k <= 0.75 for k in kept) and abs(sum(kept) / 2 - 0.5) < 0.02
    before = [m.weight_mask.clone() for m in (lamp[0], lamp[2])]
    performer.prune(lamp, 0.9, block=(16, 16), scope="lamp")
    for m, mask in zip((lamp[0], lamp[2]), before):
        assert (m.weight_mask[mask == 0] == 0).all() and m.weight_mask.sum() > 0


def test_pruned_layer_deepcopies_saves_and_loads():
    lin = layer()
    lin.prune(0.5, block=(16, 8))
    x = torch.randn(2, 70)
    twin = copy.deepcopy(lin)
    torch.testing.assert_close(twin(x), lin(x), atol=0, rtol=0)
    buf = io.BytesIO()
    torch.save(lin.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert set(state) == {"weight_orig", "weight_mask", "bias"}
    other = layer(seed=1)
    other.prune(0.0, block=(16, 8))
    other.load_state_dict(state)
    torch.testing.assert_close(other(x), lin(x), atol=0, rtol=0)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(sparsity=1.0), ValueError, r"sparsity must be in \[0, 1\).*got 1.0"),
    (dict(sparsity=-0.1), ValueError, r"sparsity must be in \[0, 1\)"),
    (dict(sparsity="half"), TypeError, "sparsity must be a float"),
    (dict(sparsity=0.5, block=(3, 8)), ValueError, r"block must be \(rows, cols\) with rows in .* got \(3, 8\)"),
    (dict(sparsity=0.5, block=16), TypeError, "block must be a \\(rows, cols\\) pair of ints"),
    (dict(sparsity=0.5, criterion="l0"), ValueError, "criterion must be one of 'l1', 'l2'"),
    (dict(sparsity=0.5, scope="model"), ValueError, "scope must be one of 'layer', 'global', 'lamp'"),
])
def test_prune_validates(kwargs, error, match):
    with pytest.raises(error, match=match):
        layer().prune(**kwargs)


def test_model_prune_validates():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        performer.prune("model", 0.5)
    with pytest.raises(ValueError, match="model has no nn.Linear layers to prune"):
        performer.prune(nn.Sequential(nn.ReLU()), 0.5)
