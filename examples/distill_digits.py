"""NORM distillation end to end on scikit-learn's bundled digits (8x8 images, no download).

    python examples/distill_digits.py            # the full run, well under a few minutes on CPU
    python examples/distill_digits.py --quick    # a smoke run of a few seconds

1. Train a teacher CNN (last stage: 128 channels at 4x4).
2. Train the same small student CNN (last stage: 32 channels at 2x2) twice from the same
   initialisation and data order: plainly (cross-entropy), and with NORM attached to its
   last stage (cross-entropy + alpha * NORM loss against the teacher's last stage, hooked
   by `norm_fast.attach(..., teacher=)` and max-pooled to 2x2 inside the hook).
3. Merge the Feature Transform into the student's classifier (`norm_fast.merge`) and check
   that the merged student has the plain student's parameter count and the same accuracy.

Needs scikit-learn (`pip install ".[examples]"` or `pip install scikit-learn`) for the data
set only.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

import norm_fast

TEACHER_CHANNELS, STUDENT_CHANNELS = 128, 32


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class CNN(nn.Module):
    """stem -> layer1 -> layer2 -> global average pooling -> fc (a ResNet-like layout).

    x (B, 1, 8, 8) -> logits (B, 10). `layer2` is the last stage: its output goes straight
    to the pooling and the linear classifier, which is what lets NORM merge away.
    """

    def __init__(self, widths, strides, classes: int = 10):
        super().__init__()
        w0, w1, w2 = widths
        s1, s2 = strides
        self.stem = conv_bn_relu(1, w0)
        self.layer1 = nn.Sequential(conv_bn_relu(w0, w1, s1), conv_bn_relu(w1, w1))
        self.layer2 = nn.Sequential(conv_bn_relu(w1, w2, s2), conv_bn_relu(w2, w2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w2, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layer2(self.layer1(self.stem(x)))), 1))


def teacher_net() -> CNN:   # 8x8 -> 8x8 -> 4x4, 128 channels
    return CNN((32, 64, TEACHER_CHANNELS), (1, 2))


def student_net() -> CNN:   # 8x8 -> 4x4 -> 2x2, 32 channels
    return CNN((8, 16, STUDENT_CHANNELS), (2, 2))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_digits_tensors(seed: int):
    """(x_train, y_train, x_test, y_test): x (B, 1, 8, 8) float32 standardised, y (B,) int64."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise SystemExit("this example needs scikit-learn: pip install scikit-learn") from e
    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(digits.images, digits.target, test_size=0.25,
                                              random_state=seed, stratify=digits.target)
    x_tr, x_te = (torch.tensor(a, dtype=torch.float32)[:, None] for a in (x_tr, x_te))
    mean, std = x_tr.mean(), x_tr.std()
    return ((x_tr - mean) / std, torch.tensor(y_tr), (x_te - mean) / std, torch.tensor(y_te))


@torch.no_grad()
def evaluate(model: nn.Module, x, y, batch_size: int = 256):
    """(accuracy in %, logits (B, 10)) in eval mode."""
    model.eval()
    logits = torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    return 100.0 * (logits.argmax(1) == y).float().mean().item(), logits


def train(model, x, y, epochs, seed, lr, batch_size=64, step_loss=None):
    """SGD with momentum and a cosine learning rate. `step_loss(model, xb, yb, epoch)` gives
    the loss of one batch (default: cross-entropy). Shuffling is seeded apart from the
    global RNG, so two runs from the same seed see the same batches."""
    step_loss = step_loss or (lambda m, xb, yb, ep: F.cross_entropy(m(xb), yb))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4,
                          nesterov=True)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            loss = step_loss(model, x[idx], y[idx], epoch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=60, help="student epochs (default 60)")
    p.add_argument("--teacher-epochs", type=int, default=None,
                   help="teacher epochs (default: same as --epochs)")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 epochs each")
    p.add_argument("--alpha", type=float, default=1.0, help="NORM loss weight (default 1)")
    p.add_argument("--ramp", action="store_true",
                   help="multiply alpha by the reference CIFAR ramp (norm_fast.norm_weight), "
                        "stretched from 240 epochs to --epochs")
    p.add_argument("--n", type=int, default=8, help="NORM expansion factor N (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: fastest for these tiny networks, and "
                        "the results do not then depend on the core count; 0 keeps torch's "
                        "default)")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.teacher_epochs = 3, 3
    teacher_epochs = args.teacher_epochs if args.teacher_epochs is not None else args.epochs
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    x_tr, y_tr, x_te, y_te = load_digits_tensors(args.seed)
    print(f"digits: {len(x_tr)} train / {len(x_te)} test images of 1x8x8, 10 classes")

    # 1. Teacher.
    torch.manual_seed(args.seed)
    teacher = teacher_net()
    train(teacher, x_tr, y_tr, teacher_epochs, args.seed, lr=0.05)
    t_acc, _ = evaluate(teacher, x_te, y_te)
    print(f"teacher          : {t_acc:6.2f}% test accuracy, {n_params(teacher):>7,} parameters "
          f"({teacher_epochs} epochs)")

    # 2a. Student, plain.
    torch.manual_seed(args.seed + 1)
    init = student_net()
    plain = copy.deepcopy(init)
    train(plain, x_tr, y_tr, args.epochs, args.seed + 1, lr=0.05)
    p_acc, _ = evaluate(plain, x_te, y_te)
    print(f"student, plain   : {p_acc:6.2f}% test accuracy, {n_params(plain):>7,} parameters")

    # 2b. Student with NORM on its last stage, same initialisation and batches.
    student = copy.deepcopy(init)
    teacher.eval().requires_grad_(False)
    # The FT after the student's layer2, fed by the teacher's layer2 through a hook: its
    # (B, 128, 4, 4) maps are max-pooled to the student's 2x2 inside the hook.
    norm = norm_fast.attach(student, "layer2", teacher=teacher, teacher_layer="layer2",
                            n=args.n)
    assert norm.teacher_channels == TEACHER_CHANNELS

    def norm_step(model, xb, yb, epoch):
        with torch.no_grad():
            teacher(xb)                                 # hands its features to the FT
        ce = F.cross_entropy(model(xb), yb)
        alpha = args.alpha
        if args.ramp:
            alpha *= norm_fast.norm_weight(epoch * 240 / max(args.epochs, 1), "cifar")
        return ce + alpha * norm.last_loss

    train(student, x_tr, y_tr, args.epochs, args.seed + 1, lr=0.05, step_loss=norm_step)
    n_acc, n_logits = evaluate(student, x_te, y_te)   # eval: no teacher, last_loss is None
    assert norm.last_loss is None
    print(f"student + NORM   : {n_acc:6.2f}% test accuracy, {n_params(student):>7,} parameters "
          f"during training (FT: {n_params(norm):,}, N={args.n})")

    # 3. Merge the FT into the classifier: a plain student again.
    _, check_diff = norm_fast.merge(student, "fc", check=x_te[:256])
    m_acc, m_logits = evaluate(student, x_te, y_te)
    diff = (m_logits - n_logits).abs().max().item()
    print(f"student, merged  : {m_acc:6.2f}% test accuracy, {n_params(student):>7,} parameters "
          f"(max |logit difference| to the unmerged student {diff:.2e}; merge check on 256 test "
          f"images {check_diff:.2e})")
    assert m_acc == n_acc, f"merged accuracy {m_acc} != unmerged {n_acc}"
    assert n_params(student) == n_params(plain), \
        f"merged student has {n_params(student)} parameters, plain {n_params(plain)}"
    print(f"NORM vs plain student: {n_acc - p_acc:+.2f} points; "
          f"total time {time.perf_counter() - t0:.1f} s")
    return {"teacher": t_acc, "plain": p_acc, "norm": n_acc, "merged": m_acc,
            "params_plain": n_params(plain), "params_merged": n_params(student)}


if __name__ == "__main__":
    main()
