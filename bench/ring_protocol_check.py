"""Every interleaving of the Gluon prefill GEMM's barrier protocol (quantization/kernels/gluon_gemm.py), for a few
K tiles and ring sizes: the partitions as small state machines, the TMA copies landing in any order, and each
mbarrier wait passing by parity as the hardware's does (a wait for phase parity P passes while the barrier's
completed phases are odd when P is 0 and even when P is 1, so a waiter two phases behind passes too early).
Reports a deadlock (no step possible before the end) or an unsafe step (a slot overwritten before its reader was
done, a tile read before it landed). No GPU.

    python bench/ring_protocol_check.py                  # the kernel's protocol and two it tried, K up to 8 tiles
    python bench/ring_protocol_check.py --tiles=6 --protocol=one_shared,shared_words   # the unsafe ones
    python bench/ring_protocol_check.py --tiles=10 --stages=7,8 --protocol=one,one_shared

Protocols (DQ_PARTS 3 dequantize partitions taking K tiles part, part + 3, ...):
- `one` (the kernel's): one ring of STAGES slots: one loader waits `empty` (the product that read the slot finished),
  copies x and the words on `ready`, one barrier per dequantize partition and slot (tile i's is
  (i % 3) * STAGES + i % STAGES, its phase i // lcm(3, STAGES)); a dequantize partition waits on it, stores the
  weight tile, arrives `w_ready`; the products wait on it and on `w_ready`, release the slot before on `empty`.
- `early`: as `one` with each tile's copies on two barriers of that index: the words on one (`ready` here) that
  the dequantize partition waits on, x on the other (`x_ready` here) that the products wait on, so a partition can
  start before x has landed. Safe, but level or slower on an H100 and taken out of the kernel
  (bench/results/prefill_pairs_h100; the code, a config's eleventh number EARLY, is in commit 2c595e2).
- `one_shared`: as `one` with one `ready` barrier per slot (the kernel before `bench/ring_protocol_check.py`):
  unsafe where STAGES is not a multiple of 3. A partition skips the others' tiles, so it can wait on a slot whose
  barrier is two phases behind (the copy of the tile STAGES before still in flight while a later one landed), and
  the parity then passes before its tile landed.
- `rings`: x in a ring of STAGES slots (its own loader, `x_ready`), the words in one ring per dequantize
  partition of W_STAGES / 3 slots (a second loader, `ready`, freed on `w_free` once dequantized); the dequantize
  partition waits `empty` for its weight tile's slot before storing it. Safe, but slower on an H100 and taken out
  of the kernel (bench/results/prefill_gluon_h100, file 20; the code is in commit 578c0c9).
- `shared_words`: as `rings` with one words ring that every partition takes its tiles from (a partition skips the
  others' tiles): unsafe, a partition can wait on a slot two phases behind; kept to show that the check finds it.
"""
import argparse
import itertools
import math

PARTS = 3


def check(tiles, stages, w_stages, protocol, n_parts=PARTS):
    """(states explored, [problems]) for `tiles` K tiles, STAGES x slots, W_STAGES words slots (unused by `one`),
    n_parts dequantize partitions."""
    w_stages = stages if protocol in ("one", "one_shared", "early") else w_stages

    def word_slot(i):  # (slot, lap) of tile i's words
        if protocol == "rings":
            per = w_stages // n_parts
            k = i // n_parts
            return (i % n_parts) * per + k % per, k // per
        return i % w_stages, i // w_stages

    one = protocol in ("one", "one_shared", "early")
    split = protocol == "early"  # x on a barrier of its own (per partition and slot, as the words')
    period = math.lcm(n_parts, stages) if protocol in ("one", "early") else None

    def ready_index(i):  # the barrier a tile's copies complete: per (partition, slot) for `one` and `early`
        if period:
            return (i % n_parts) * stages + i % stages
        return word_slot(i)[0]

    def ready_lap(i):
        return i // period if period else word_slot(i)[1]

    def passes(completed, parity):
        return (completed & 1) != parity

    # state: loader x (or the one loader), loader w, each partition's (tile, step), products' (tile, step), the
    # barriers' completed phases (empty, x_ready, w_ready, ready, w_free), copies in flight, what each slot holds,
    # the tiles dequantized, the last tile whose slot the products released
    start = (0, 0, tuple((p, 0) for p in range(n_parts)), (0, 0),
             ((0,) * stages, (0,) * (n_parts * stages if split else stages), (0,) * stages,
              (0,) * (n_parts * stages if period else w_stages),
              (0,) * w_stages),
             frozenset(), ((-1,) * stages, (-1,) * stages, (-1,) * w_stages), frozenset(), -1)
    seen, stack, problems = set(), [start], []
    while stack:
        state = stack.pop()
        if state in seen:
            continue
        seen.add(state)
        xl, wl, parts, prod, bars, flight, slots, done, released = state
        empty, x_ready, w_ready, ready, w_free = bars
        x_slots, w_slots, q_slots = slots
        nexts = []

        def step(**change):
            values = dict(xl=xl, wl=wl, parts=parts, prod=prod, empty=empty, x_ready=x_ready, w_ready=w_ready,
                          ready=ready, w_free=w_free, flight=flight, x_slots=x_slots, w_slots=w_slots,
                          q_slots=q_slots, done=done, released=released)
            values.update(change)
            v = values
            nexts.append((v["xl"], v["wl"], v["parts"], v["prod"],
                          (v["empty"], v["x_ready"], v["w_ready"], v["ready"], v["w_free"]), v["flight"],
                          (v["x_slots"], v["w_slots"], v["q_slots"]), v["done"], v["released"]))

        def bump(t, i):
            return t[:i] + (t[i] + 1,) + t[i + 1:]

        def put(t, i, value):
            return t[:i] + (value,) + t[i + 1:]

        if xl < tiles and passes(empty[xl % stages], ((xl // stages) & 1) ^ 1):  # the (x) loader
            if released < xl - stages:
                problems.append(f"x slot of tile {xl - stages} overwritten before its product finished")
                continue
            if one and q_slots[xl % stages] >= 0 and q_slots[xl % stages] not in done:
                problems.append(f"words of tile {q_slots[xl % stages]} overwritten before they were dequantized")
                continue
            copies = {("x", xl)} | ({("q", xl)} if one else set())
            step(xl=xl + 1, flight=flight | copies)
        if not one and wl < tiles:  # the words' loader
            q, lap = word_slot(wl)
            if passes(w_free[q], (lap & 1) ^ 1):
                if q_slots[q] >= 0 and q_slots[q] not in done:
                    problems.append(f"words of tile {q_slots[q]} overwritten before they were dequantized")
                    continue
                step(wl=wl + 1, flight=flight | {("q", wl)})
        for kind, i in flight:  # a copy lands (one barrier per slot for `one`: it completes when both have)
            rest = flight - {(kind, i)}
            if kind == "x":
                s = i % stages
                if split:
                    step(flight=rest, x_slots=put(x_slots, s, i), x_ready=bump(x_ready, ready_index(i)))
                elif one:
                    step(flight=rest, x_slots=put(x_slots, s, i),
                         ready=ready if ("q", i) in rest else bump(ready, ready_index(i)))
                else:
                    step(flight=rest, x_slots=put(x_slots, s, i), x_ready=bump(x_ready, s))
            else:
                q = word_slot(i)[0]
                if split:
                    step(flight=rest, q_slots=put(q_slots, q, i), ready=bump(ready, ready_index(i)))
                elif one:
                    step(flight=rest, q_slots=put(q_slots, q, i),
                         ready=ready if ("x", i) in rest else bump(ready, ready_index(i)))
                else:
                    step(flight=rest, q_slots=put(q_slots, q, i), ready=bump(ready, q))
        for p, (i, stage) in enumerate(parts):  # the dequantize partitions
            if i >= tiles:
                continue
            s, (q, lap) = i % stages, word_slot(i)
            if stage == 0 and passes(ready[ready_index(i)], ready_lap(i) & 1):
                if q_slots[q] != i:
                    problems.append(f"partition {p} read tile {i}'s words from a slot holding tile {q_slots[q]}")
                    continue
                step(parts=put(parts, p, (i, 1)))
            elif stage == 1 and (one or passes(empty[s], ((i // stages) & 1) ^ 1)):
                if released < i - stages:
                    problems.append(f"weight slot of tile {i - stages} overwritten before its product finished")
                    continue
                step(parts=put(parts, p, (i + n_parts, 0)), w_slots=put(w_slots, s, i), w_ready=bump(w_ready, s),
                     w_free=w_free if one else bump(w_free, q), done=done | {i})
        i, stage = prod
        if i < tiles:  # the products
            s = i % stages
            if stage == 0 and (passes(x_ready[ready_index(i)], ready_lap(i) & 1) if split
                               else passes(ready[ready_index(i)], ready_lap(i) & 1) if one
                               else passes(x_ready[s], (i // stages) & 1)):
                step(prod=(i, 1))
            elif stage == 1 and passes(w_ready[s], (i // stages) & 1):
                if x_slots[s] != i or w_slots[s] != i:
                    problems.append(f"product {i} read tiles {x_slots[s]} (x) and {w_slots[s]} (weight)")
                    continue
                step(prod=(i + 1, 0), empty=bump(empty, (i - 1) % stages) if i else empty, released=i - 1)
        if not nexts and not (xl == tiles and (one or wl == tiles) and prod[0] == tiles
                              and all(t >= tiles for t, _ in parts) and not flight):
            problems.append(f"deadlock: loaders at {xl}/{wl}, partitions at {[t for t, _ in parts]}, "
                            f"products at {prod[0]}")
        stack.extend(nexts)
    return len(seen), sorted(set(problems))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiles", type=int, default=8, help="the largest number of K tiles checked (every count from 0)")
    p.add_argument("--stages", default="2,3,4", help="comma-separated ring sizes for one, early and one_shared (the "
                   "kernel's first config has 8: --stages=8 --tiles=10 takes about a minute a protocol)")
    p.add_argument("--protocol", default="one,early,rings", help="comma-separated: one, early, one_shared, rings, "
                   "shared_words")
    p.add_argument("--parts", type=int, default=PARTS, help="dequantize partitions (the kernel's DQ_PARTS, 1 to 4)")
    args = p.parse_args()
    bad = 0
    for protocol in args.protocol.split(","):
        if protocol in ("one", "one_shared", "early"):
            sizes = [(int(s), int(s)) for s in args.stages.split(",")]
        else:  # the words' rings: a third for each partition; x's ring at least 3 slots (as the kernel had them)
            sizes = list(itertools.product((3, 4), (3, 6, 9)))
        for (stages, w_stages), tiles in itertools.product(sizes, range(args.tiles + 1)):
            states, problems = check(tiles, stages, w_stages, protocol, args.parts)
            if problems:
                bad += 1
                print(f"{protocol}: {tiles} tiles, {stages} stages, {w_stages} words slots: {problems[0]} "
                      f"({len(problems)} kinds, {states} states)")
        print(f"{protocol}: checked up to {args.tiles} tiles")
    print("no problem found" if not bad else f"{bad} cases with problems")


if __name__ == "__main__":
    main()
