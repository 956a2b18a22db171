"""Optimizers, schedules, callbacks, checkpoints and resume (issue 5)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import symbp as sb

NET = sb.Network(inputs=5, layers=[sb.Dense(4, activation="tanh"), sb.Dense(3)], l2=0.0, name="optim-net")
NET_L2 = sb.Network(inputs=5, layers=[sb.Dense(4, activation="sigmoid"), sb.Dense(3)], l2=0.01, name="optim-net-l2")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(16, 5)), rng.integers(0, 3, 16)


# (symbp optimizer, the same in torch.optim)
CASES = {
    "sgd": (lambda: sb.SGD(lr=0.1), lambda t, p: t.optim.SGD(p, lr=0.1)),
    "sgd-momentum": (lambda: sb.SGD(lr=0.1, momentum=0.9), lambda t, p: t.optim.SGD(p, lr=0.1, momentum=0.9)),
    "sgd-nesterov-wd": (lambda: sb.SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
                        lambda t, p: t.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "adagrad": (lambda: sb.Adagrad(lr=0.1, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1),
                lambda t, p: t.optim.Adagrad(p, lr=0.1, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1)),
    "rmsprop": (lambda: sb.RMSprop(lr=0.01), lambda t, p: t.optim.RMSprop(p, lr=0.01)),
    "rmsprop-centered-momentum": (lambda: sb.RMSprop(lr=0.01, centered=True, momentum=0.5, weight_decay=0.01),
                                  lambda t, p: t.optim.RMSprop(p, lr=0.01, centered=True, momentum=0.5, weight_decay=0.01)),
    "adam": (lambda: sb.Adam(lr=0.01), lambda t, p: t.optim.Adam(p, lr=0.01)),
    "adam-amsgrad-wd": (lambda: sb.Adam(lr=0.01, amsgrad=True, weight_decay=0.01),
                        lambda t, p: t.optim.Adam(p, lr=0.01, amsgrad=True, weight_decay=0.01)),
    "adamw": (lambda: sb.AdamW(lr=0.01), lambda t, p: t.optim.AdamW(p, lr=0.01)),
}


@pytest.mark.parametrize("name", ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW"])
def test_defaults_are_torch_optims(name):
    """Every argument both constructors take has the same default (torch's SGD lr is 1e-3)."""
    import inspect

    torch = pytest.importorskip("torch")
    ours = inspect.signature(getattr(sb, name)).parameters
    theirs = inspect.signature(getattr(torch.optim, name)).parameters
    shared = [k for k in ours if k in theirs]
    assert "lr" in shared and len(shared) >= 3, shared
    for k in shared:
        assert ours[k].default == theirs[k].default, f"{name}({k}=…): ours {ours[k].default!r}, torch {theirs[k].default!r}"


def torch_trajectory(torch, params, make_opt, X, y, steps, l2=0.0, act="tanh"):
    P = {k: torch.tensor(v.copy(), dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    opt = make_opt(torch, list(P.values()))
    f = {"tanh": torch.tanh, "sigmoid": torch.sigmoid}[act]
    for _ in range(steps):
        opt.zero_grad()
        h = f(torch.tensor(X) @ P["W1"].T + P["b1"])
        out = h @ P["W2"].T + P["b2"]
        loss = torch.nn.functional.cross_entropy(out, torch.tensor(y))
        loss = loss + l2 / 2 * (P["W1"].pow(2).sum() + P["W2"].pow(2).sum())
        loss.backward()
        opt.step()
    return {k: v.detach().numpy() for k, v in P.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_trajectory_matches_torch_optim(compiled, data, name):
    torch = pytest.importorskip("torch")
    X, y = data
    ours, theirs = CASES[name]
    model = compiled(NET, "float64", seed=1)
    expected = torch_trajectory(torch, model.params, theirs, X, y, 20)
    model.fit(X, y, optimizer=ours(), batch_size=len(X), epochs=20, shuffle=False, progress=False)
    for k in expected:
        np.testing.assert_allclose(model.params[k], expected[k], rtol=0, atol=1e-10, err_msg=f"{name}: {k}")


def test_trajectory_with_loss_l2_matches_torch(compiled, data):
    torch = pytest.importorskip("torch")
    X, y = data
    model = compiled(NET_L2, "float64", seed=2)
    expected = torch_trajectory(torch, model.params, CASES["adam"][1], X, y, 20, l2=0.01, act="sigmoid")
    model.fit(X, y, optimizer=sb.Adam(lr=0.01), batch_size=len(X), epochs=20, shuffle=False, progress=False)
    for k in expected:
        np.testing.assert_allclose(model.params[k], expected[k], rtol=0, atol=1e-10)


def test_state_is_inspectable_numpy(compiled, data):
    X, y = data
    model = compiled(NET, "float64")
    opt = sb.Adam(lr=0.01)
    model.fit(X, y, optimizer=opt, batch_size=8, epochs=2, shuffle=False, progress=False)
    assert opt.step == 4
    assert set(opt.state) == set(model.params)
    for name, value in model.params.items():
        assert opt.state[name]["exp_avg"].shape == value.shape
        assert np.abs(opt.state[name]["exp_avg_sq"]).sum() > 0


def test_formula_optimizer_equals_builtin_momentum(compiled, data):
    X, y = data
    a, b = compiled(NET, "float64", seed=3), compiled(NET, "float64", seed=3)
    a.fit(X, y, optimizer=sb.SGD(lr=0.1, momentum=0.9), batch_size=4, epochs=3, seed=0, progress=False)
    mine = sb.FormulaOptimizer("theta - lr*m", state={"m": "beta*m + g"}, lr=0.1, beta=0.9, name="heavy-ball")
    b.fit(X, y, optimizer=mine, batch_size=4, epochs=3, seed=0, progress=False)
    for k in a.params:
        np.testing.assert_allclose(a.params[k], b.params[k], rtol=0, atol=1e-14)
    assert "m" in mine.state["W1"]


def test_formula_optimizer_rejects_bad_formulas():
    with pytest.raises(ValueError, match="unknown symbol 'v'"):
        sb.FormulaOptimizer("theta - lr*v", lr=0.1)
    with pytest.raises(ValueError, match="needs an 'lr'"):
        sb.FormulaOptimizer("theta - g")
    with pytest.raises(ValueError, match="cannot be a state"):
        sb.FormulaOptimizer("theta - lr*g", state={"theta": "g"}, lr=0.1)


@pytest.mark.parametrize("make, match", [
    (lambda: sb.SGD(lr=-1), "learning rate"),
    (lambda: sb.SGD(lr=0.1, momentum=1.0), "momentum"),
    (lambda: sb.SGD(lr=0.1, nesterov=True), "nesterov"),
    (lambda: sb.Adam(betas=(0.9, 1.0)), "beta2"),
    (lambda: sb.Adam(eps=-1), "eps"),
    (lambda: sb.RMSprop(alpha=1.5), "alpha"),
    (lambda: sb.Adagrad(lr=float("nan")), "learning rate"),
    (lambda: sb.AdamW(weight_decay=-0.1), "weight_decay"),
    (lambda: sb.StepDecay(0), "step_size"),
    (lambda: sb.ExponentialDecay(-0.5), "gamma"),
    (lambda: sb.CosineDecay(T_max=1.5), "T_max"),
    (lambda: sb.ReduceLROnPlateau(factor=1.5), "factor"),
    (lambda: sb.EarlyStopping(patience=-1), "patience"),
])
def test_invalid_hyper_parameters_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_schedules_against_hand_computed_values():
    assert [sb.StepDecay(2, gamma=0.5).lr(e, 1.0) for e in range(5)] == [1.0, 1.0, 0.5, 0.5, 0.25]
    assert sb.ExponentialDecay(0.9).lr(3, 2.0) == pytest.approx(2.0 * 0.729)
    cos = sb.CosineDecay(T_max=4, eta_min=0.1)
    assert [round(cos.lr(e, 1.1), 12) for e in range(5)] == [1.1, round(0.1 + 0.5 * (1 + math.cos(math.pi / 4)), 12),
                                                            0.6, round(0.1 + 0.5 * (1 + math.cos(3 * math.pi / 4)), 12), 0.1]
    plateau = sb.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=1)
    lrs = []
    for epoch, v in enumerate([1.0, 0.9, 0.95, 0.95, 0.95, 0.8]):
        lrs.append(plateau.lr(epoch, 1.0))
        plateau.observe(epoch, {"val_loss": v})
    # bad epochs: 0.95 (1), 0.95 (2 > patience: halve), 0.95 (1), 0.8 improves
    assert lrs == [1.0, 1.0, 1.0, 1.0, 0.5, 0.5]


def test_schedules_match_torch():
    torch = pytest.importorskip("torch")
    p = [torch.zeros(1, requires_grad=True)]
    for ours, make in [(sb.StepDecay(3, gamma=0.3), lambda o: torch.optim.lr_scheduler.StepLR(o, 3, gamma=0.3)),
                       (sb.ExponentialDecay(0.8), lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.8)),
                       (sb.CosineDecay(T_max=7, eta_min=0.01), lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 7, 0.01))]:
        opt = torch.optim.SGD(p, lr=0.5)
        sched = make(opt)
        for epoch in range(10):
            assert ours.lr(epoch, 0.5) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15)
            opt.step()
            sched.step()


def test_fit_applies_schedule_per_epoch(compiled, data):
    X, y = data
    model = compiled(NET, "float64")
    h = model.fit(X, y, optimizer=sb.SGD(lr=0.2), schedule=sb.StepDecay(2, gamma=0.5), batch_size=8, epochs=5,
                  progress=False)
    assert h["lr"] == [0.2, 0.2, 0.1, 0.1, 0.05]


def test_early_stopping_restores_best_weights(compiled, data):
    X, y = data
    model = compiled(NET, "float64")
    # A learning rate this large makes the validation loss bounce, so it stops early.
    stopper = sb.EarlyStopping(monitor="val_loss", patience=1, restore_best_weights=True)
    h = model.fit(X, y, optimizer=sb.SGD(lr=5.0), batch_size=4, epochs=30, validation_data=(X, y), callbacks=[stopper],
                  progress=False)
    assert stopper.stopped_epoch is not None and len(h.epoch) < 30
    best = int(np.argmin(h["val_loss"]))
    assert stopper.best_epoch == h.epoch[best]
    assert model.evaluate(X, y)[0] == pytest.approx(h["val_loss"][best], rel=1e-12)


@pytest.mark.parametrize("watcher", ["schedule", "callback"])
def test_a_monitor_the_fit_does_not_record_is_refused_before_training(compiled, data, watcher):
    X, y = data
    model = compiled(NET, "float64")
    before = {k: v.copy() for k, v in model.params.items()}
    kwargs = ({"schedule": sb.ReduceLROnPlateau(monitor="val_loss")} if watcher == "schedule"
              else {"callbacks": [sb.EarlyStopping(monitor="val_accuracy")]})
    name = "ReduceLROnPlateau" if watcher == "schedule" else "EarlyStopping"
    with pytest.raises(ValueError, match=rf"{name} monitors 'val_\w+', which this fit does not record \(it records "
                                         r"loss, accuracy, lr\); pass validation_data"):
        model.fit(X, y, epochs=3, progress=False, **kwargs)
    # nothing changed: no epoch ran, the schedule was not adopted, the next plain fit just works
    for k, v in before.items():
        np.testing.assert_array_equal(model.params[k], v)
    assert model.epoch == 0 and model.schedule is None and model.optimizer is None and not model.history.epoch
    assert len(model.fit(X, y, epochs=1, progress=False).epoch) == 1
    # with validation data the same watcher is fine
    model.fit(X, y, epochs=2, validation_data=(X, y), progress=False, **kwargs)


def test_model_checkpoint_arguments_are_checked_up_front(compiled, data, tmp_path):
    X, y = data
    with pytest.raises(ValueError, match="is a directory: give a file name"):
        sb.ModelCheckpoint(tmp_path)
    with pytest.raises(ValueError, match="mode must be 'min' or 'max'"):
        sb.ModelCheckpoint(tmp_path / "m.npz", mode="lowest")
    model = compiled(NET, "float64")
    with pytest.raises(ValueError, match="ModelCheckpoint monitors 'val_loss', which this fit does not record"):
        model.fit(X, y, epochs=2, callbacks=[sb.ModelCheckpoint(tmp_path / "m.npz", monitor="val_loss")], progress=False)
    assert model.epoch == 0 and not (tmp_path / "m.npz").exists()


def test_nan_loss_stops_with_last_good_weights(compiled, data):
    X, _ = data
    # A linear regression with a far too large step diverges until the loss overflows.
    model = compiled(sb.Network(inputs=5, layers=[sb.Dense(4), sb.Dense(3)], loss="mse", name="diverge"), "float64")
    target = np.ones((len(X), 3))
    with pytest.raises(FloatingPointError, match=r"epoch (\d+) \(0-based\), batch \d+") as err:
        model.fit(X, target, optimizer=sb.SGD(lr=50.0), batch_size=4, epochs=200, progress=False)
    bad_epoch = int(err.value.args[0].split("epoch ")[1].split(" ")[0])
    assert model.epoch == bad_epoch  # the epochs before it completed
    for value in model.params.values():
        assert np.isfinite(value).all()
    # Restored to the start of the failing epoch: every batch of the epoch before was finite.
    assert model.history["loss"] and np.isfinite(model.history["loss"][-1])


def test_nan_loss_in_full_batch_training_keeps_the_failing_epochs_start(compiled, data):
    # One batch per epoch: the model must hold exactly what an unbroken run of the good epochs gives.
    X, _ = data
    net = sb.Network(inputs=5, layers=[sb.Dense(4), sb.Dense(3)], loss="mse", name="diverge")
    target = np.ones((len(X), 3))
    model = compiled(net, "float64", seed=1)
    opt = sb.SGD(lr=50.0, momentum=0.5)
    with pytest.raises(FloatingPointError, match=r"epoch (\d+) \(0-based\), batch 0\b") as err:
        model.fit(X, target, optimizer=opt, batch_size=len(X), epochs=500, progress=False)
    bad_epoch = int(err.value.args[0].split("epoch ")[1].split(" ")[0])
    assert model.epoch == bad_epoch > 1 and opt.step == bad_epoch
    twin = compiled(net, "float64", seed=1)
    twin_opt = sb.SGD(lr=50.0, momentum=0.5)
    twin.fit(X, target, optimizer=twin_opt, batch_size=len(X), epochs=bad_epoch, progress=False)
    for name, value in twin.params.items():
        np.testing.assert_array_equal(model.params[name], value)
        np.testing.assert_array_equal(opt.state[name]["momentum_buffer"], twin_opt.state[name]["momentum_buffer"])


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value encountered:RuntimeWarning")
def test_a_last_update_that_overflows_is_caught(compiled, data):
    """No loss of the epoch sees its last update: fit checks the parameters after it, so a
    run never returns normally with NaN or inf weights (nor restores to a broken start)."""
    X, _ = data
    X = X * 1e3  # gradients ~ 1e3 and more: an lr of 1e306 overflows the step, not the loss before it
    y = np.ones((len(X), 3))
    model = compiled(sb.Network(inputs=5, layers=[sb.Dense(4), sb.Dense(3)], loss="mse", name="diverge"), "float64")
    start = {k: v.copy() for k, v in model.params.items()}
    opt = sb.SGD(lr=1e306)
    with pytest.raises(FloatingPointError, match=r"the update of batch 0, the last of epoch 0 \(0-based\)"):
        model.fit(X, y, optimizer=opt, batch_size=len(X), epochs=1, progress=False)
    assert model.epoch == 0 and opt.step == 0
    for k, v in start.items():
        np.testing.assert_array_equal(model.params[k], v)
    # A later epoch: that epoch is the one named and undone, the good ones before it stay.
    model.fit(X, y, optimizer=sb.SGD(lr=1e-6), batch_size=len(X), epochs=2, progress=False)
    good = {k: v.copy() for k, v in model.params.items()}
    with pytest.raises(FloatingPointError, match=r"the update of batch 0, the last of epoch 2 \(0-based\)"):
        model.fit(X, y, optimizer=sb.SGD(lr=1e306), batch_size=len(X), epochs=4, initial_epoch=2, progress=False)
    assert model.epoch == 2
    for k, v in good.items():
        np.testing.assert_array_equal(model.params[k], v)


def test_save_and_resume_is_bit_for_bit(compiled, data, tmp_path):
    X, y = data
    opt_args = dict(lr=0.05, weight_decay=0.01)
    straight = compiled(NET, "float64", seed=4)
    straight.fit(X, y, optimizer=sb.AdamW(**opt_args), schedule=sb.CosineDecay(6), batch_size=5, epochs=6, seed=7,
                 progress=False)

    first = compiled(NET, "float64", seed=4)
    first.fit(X, y, optimizer=sb.AdamW(**opt_args), schedule=sb.CosineDecay(6), batch_size=5, epochs=3, seed=7,
              progress=False)
    path = first.save(tmp_path / "ckpt.npz")
    resumed = sb.load(path, cache_dir=first.source_path.parent)
    assert resumed.epoch == 3 and isinstance(resumed.optimizer, sb.AdamW) and resumed.optimizer.step == first.optimizer.step
    resumed.fit(X, y, batch_size=5, epochs=6, initial_epoch=3, seed=7, progress=False)  # no optimizer: the restored one
    for k in straight.params:
        assert np.array_equal(resumed.params[k], straight.params[k]), k
    assert resumed.history["loss"] == straight.history["loss"]


@pytest.mark.parametrize("damage", ["truncate", "flip-array-byte", "not-npz", "edit-meta"])
def test_damaged_checkpoint_is_refused(compiled, data, tmp_path, damage):
    X, y = data
    model = compiled(NET, "float64")
    model.fit(X, y, optimizer=sb.Adam(lr=0.01), epochs=1, progress=False)
    path = model.save(tmp_path / "m.npz")
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "not-npz":
        path.write_bytes(b"print('hello')\n")
    elif damage == "flip-array-byte":
        import io
        import zipfile

        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k].copy() for k in f.files}
        arrays["param/W1"].reshape(-1)[0] += 1.0
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        path.write_bytes(buf.getvalue())
        assert zipfile.is_zipfile(path)
    else:
        import io
        import json

        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k].copy() for k in f.files}
        meta = json.loads(arrays["meta"].tobytes())
        meta["epoch"] = 99
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        path.write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="checkpoint"):
        sb.load(path)


def test_crash_mid_save_keeps_previous_checkpoint(compiled, data, tmp_path, monkeypatch):
    X, y = data
    model = compiled(NET, "float64")
    path = model.save(tmp_path / "m.npz")
    before = path.read_bytes()
    model.fit(X, y, epochs=1, progress=False)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("symbp._output.os.replace", boom)  # the one atomic writer
    with pytest.raises(OSError):
        model.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.npz"]  # no temporary left behind


def test_checkpoint_path_that_is_a_directory_is_refused(compiled, tmp_path):
    model = compiled(NET, "float64")
    (tmp_path / "runs").mkdir()
    with pytest.raises(ValueError, match=r"runs is a directory: give a file name, e\.g\. .*runs/model\.npz"):
        model.save(tmp_path / "runs")
    assert [p.name for p in tmp_path.iterdir()] == ["runs"] and not any((tmp_path / "runs").iterdir())
    assert model.save(tmp_path / "runs" / "m").name == "m.npz"  # a name without .npz gets it


def test_history_plot_writes_png(compiled, data, tmp_path):
    pytest.importorskip("matplotlib")
    X, y = data
    model = compiled(NET, "float64")
    h = model.fit(X, y, epochs=3, validation_data=(X, y), progress=False)
    out = h.plot(tmp_path / "curves.png")
    assert out is not None
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
