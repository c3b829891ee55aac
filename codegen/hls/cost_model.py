"""Analytical latency and resource estimates of the generated HLS layers, without Vitis.

One layer is the kernel of ``templates/kernel.cpp.j2``; per input vector (one row):

1. ``load``: K elements from the input stream into ``x`` (II=1), then zeros up to K padded;
2. ``tiles``: N/PE times: ``groups`` times: a pipelined loop (II=1) of words_per_group/SIMD
   steps in which each of the PE lanes reads SIMD 32-bit words and adds ``(code - zp) * x``
   of their ``codes_per_word`` codes into an exact partial sum; after that loop, in the group
   loop body, one ``acc += part * scale`` per PE;
3. ``store``: PE outputs (bias, relu, cast), one per cycle.

The group loop is not pipelined and not flattened (its body has code after the inner loop),
so every group pays the word pipeline's fill and drain plus the scale multiply: with a few
words per group, that overhead dominates and PE is the lever that pays, not SIMD.

Results use the keys of a Vitis HLS csynth report (``BestLatency``, ``WorstLatency``,
``IntervalMin`` in cycles; ``DSP``, ``BRAM_18K``, ``URAM``, ``LUT``, ``FF``) so that a user can
compare them with ``<top>_csynth.xml``. Sources of the formulas:

- FINN-R (Blott et al., 2018), as coded in FINN's ``MatrixVectorActivation``:
  LUT = c0 + c1 * PE * (multipliers + adder tree + accumulator) + LUTRAM, and BRAM_18K per
  memory from its width and depth (RAMB18 aspect ratios of UG573);
- Xilinx DSP48E2 (UG579): one DSP multiplies 27 x 18 bits (two's complement);
- hls4ml: one multiplier per product unrolled in a cycle (``multiplier_limit``);
- everything marked "assumption" is ours, to be calibrated against csynth reports.

Ignored: clock-dependent operator latencies (all at the constants below), DSP packing of
several narrow products into one DSP, BRAM dual-port sharing of two banks, the FIFOs between
layers and the DATAFLOW control logic, routing, and post-synthesis optimizations (constant
propagation into ROM contents, LUT-combining). Expect csynth to differ by tens of percent.
"""
from __future__ import annotations

import math

RESOURCES = ("DSP", "BRAM_18K", "URAM", "LUT", "FF")

# ---- latency constants (cycles); assumption: typical Vitis schedules at 100-300 MHz ---------
LOAD_DEPTH = 2         # stream read + buffer write of the load pipeline
MEM_READ = 2           # ROM address register + BRAM output register
DECODE_MUL = 2         # (code - zp) then the LUT multiply, one register each
PART_ADD = 1           # the partial-sum register at the end of the adder tree
SCALE_MUL = 3          # DSP48E2 with A/B, M and P registers (hls4ml issue #49 sees 3 stages)
ACC_ADD = 1            # acc += product
STORE_DEPTH = 3        # bias add, relu + cast, stream write
LOOP_OVERHEAD = 1      # entering/leaving a loop that is not pipelined costs a cycle per trip
FUNC_OVERHEAD = 2      # ap_start to first state, last state to ap_done
STREAM_HOP = 2         # FIFO write-to-read latency between DATAFLOW processes

# ---- resource constants -------------------------------------------------------------------
FINN_C0 = 300          # FINN-R: LUTs of control per layer
FINN_C1 = 1.1          # FINN-R: overhead factor on the datapath LUTs
DSP_A, DSP_B = 27, 18  # DSP48E2 multiplier ports (UG579); a 7-series DSP48E1 has 25 x 18
# Assumption: Vitis builds a product in LUTs when its narrower operand has at most this many
# bits (4-bit codes: 5-bit operand, LUTs) and in DSPs otherwise (8-bit codes: 9-bit, DSP).
# The real choice is per operator and moves with the clock and the tool version.
LUT_MULT_MAX_WIDTH = 8
# Assumption: a memory of at most 64 words goes to LUTRAM (one LUT6 is a 64 x 1 ROM, FINN-R's
# ceil(depth / 64) term); deeper ones go to BRAM. URAM is never used: the kernel binds no
# storage and Vitis does not pick URAM by itself.
LUTRAM_MAX_DEPTH = 64
FF_CONTROL = 100       # assumption: FSM, loop counters and stream handshakes per layer
WORD_BITS = 32         # weight codes are packed into 32-bit words


def _clog2(x: int) -> int:
    return max(0, math.ceil(math.log2(x))) if x > 1 else 0


def uses_dsp(a: int, b: int) -> bool:
    """Whether an a x b bit product is built from DSPs (see LUT_MULT_MAX_WIDTH)."""
    return min(a, b) > LUT_MULT_MAX_WIDTH


def dsp_per_product(a: int, b: int) -> int:
    """DSP48E2s of an a x b product: the wider operand on the 27-bit port (UG579)."""
    return math.ceil(max(a, b) / DSP_A) * math.ceil(min(a, b) / DSP_B)


def lut_per_product(a: int, b: int) -> int:
    """LUTs of an a x b product built in fabric: FINN-R's (2 * ceil((W+A)/6) - 1) * (W+A)."""
    return (2 * math.ceil((a + b) / 6) - 1) * (a + b)


def bram18_for(width: int, depth: int) -> int:
    """RAMB18s of one width x depth memory (FINN-R's rules on the UG573 aspect ratios)."""
    if width <= 1:
        return math.ceil(depth / 16384)
    if width <= 2:
        return math.ceil(depth / 8192)
    if width <= 4:
        return math.ceil(depth / 4096)
    if width <= 9:
        return math.ceil(depth / 2048)
    if width <= 18 or depth > 512:
        return math.ceil(depth / 1024) * math.ceil(width / 18)
    return math.ceil(depth / 512) * math.ceil(width / 36)


def memory(width: int, depth: int, count: int = 1) -> dict:
    """BRAM_18K and LUTs of ``count`` equal memories (LUTRAM when shallow, see above)."""
    if depth <= LUTRAM_MAX_DEPTH:
        # FINN-R's LUTRAM term: width * ceil(depth / 64) LUTs per memory.
        return {"BRAM_18K": 0, "LUT": count * width * math.ceil(depth / 64)}
    return {"BRAM_18K": count * bram18_for(width, depth), "LUT": 0}


def _check(cfg: dict, pe: int, simd: int) -> None:
    n, wpg = cfg["n"], cfg["words_per_group"]
    if pe < 1 or n % pe:
        raise ValueError(f"pe={pe} must divide n={n}")
    if simd < 1 or wpg % simd:
        raise ValueError(f"simd={simd} must divide words_per_group={wpg}")


def estimate_stream_layer(cfg: dict, pe: int, simd: int) -> dict:
    """Cycles per image and resources of one CNN layer (``templates/cnn_kernel.cpp.j2``).

    conv (``cfg`` from ``cnn.cnn_design``), per image, with HP x WP the padded map:

    - fill: HP * WP * C cycles (one code a cycle into the line buffer, II=1) + LOAD_DEPTH per row;
    - compute, for each of the OH output rows (after its last input row is in): OW * M/PE
      tiles, each a MAC pipeline of K/SIMD steps (K = KH*KW*C/group) of depth
      MEM_READ + DECODE_MUL + clog2(SIMD) + PART_ADD, then PE requantizations at II=1 behind a
      REQUANT_DEPTH pipeline (acc * M in DSPs, two rounding shifts, clamp);
    - latency = FUNC_OVERHEAD + fill + compute (the row loop is not pipelined: the fill and the
      compute of a row do not overlap), interval = latency + 1;
    - DSP: PE*SIMD products of (w_bits x 9) (DSP above LUT_MULT_MAX_WIDTH, else LUTs) plus PE
      requant products of 32 x 32 (x 2 with a residual);
    - memories: W as PE*SIMD banks of M*K/(PE*SIMD) words of w_bits; B/M/S as PE banks; the
      line buffer as lb_rows*SIMD banks of WP*C/SIMD 9-bit words (dim 1 complete, dim 3 cyclic).

    pool: fill as conv, then OH * OW * C outputs at II=1 (the KH*KW window unrolled: a tree of
    comparators or adders); the line buffer as KH banks of WP*C words. dup: one code a cycle;
    its second output FIFO buffers a whole map (the skip path), counted here in BRAM.
    """
    kind = cfg["kind"]
    if kind == "dup":
        count = cfg["count"]
        latency = FUNC_OVERHEAD + count + LOAD_DEPTH
        fifo = memory(8, count)
        return {"BestLatency": latency, "WorstLatency": latency, "IntervalMin": latency + 1,
                "DSP": 0, "BRAM_18K": fifo["BRAM_18K"], "URAM": 0,
                "LUT": FINN_C0 // 3 + fifo["LUT"], "FF": FF_CONTROL + 16,
                "pe": 1, "simd": 1, "cycles": {"load": count, "compute": 0, "store": 0},
                "products": 0}
    if pe < 1 or cfg["n"] % pe or simd < 1 or cfg["words_per_group"] % simd:
        raise ValueError(f"pe={pe} must divide {cfg['n']} and simd={simd} must divide "
                         f"{cfg['words_per_group']}")
    hp, wp = cfg["h"] + cfg["pt"] + cfg["pb"], cfg["w"] + cfg["pl"] + cfg["pr"]
    c, oh, ow = cfg["c"], cfg["oh"], cfg["ow"]
    fill = hp * (wp * c + LOAD_DEPTH + LOOP_OVERHEAD)
    lb = memory(9 if kind == "conv" else 8, math.ceil(wp * c / simd), cfg["lb_rows"] * simd)
    if kind == "pool":
        window = cfg["kh"] * cfg["kw"]
        compute = oh * (ow * c + _clog2(window) + STORE_DEPTH + LOOP_OVERHEAD)
        latency = FUNC_OVERHEAD + fill + compute
        lut = FINN_C0 + FINN_C1 * window * (8 + 4)  # comparators / adders of the window
        if cfg["pool"] == "average":
            lut += 40 * cfg["sum_bits"]  # assumption: a sequential-free LUT divider by a small int
        return {"BestLatency": latency, "WorstLatency": latency, "IntervalMin": latency + 1,
                "DSP": 0, "BRAM_18K": lb["BRAM_18K"], "URAM": 0,
                "LUT": int(math.ceil(lut + lb["LUT"])), "FF": FF_CONTROL + window * 8 + 64,
                "pe": 1, "simd": 1, "cycles": {"load": fill, "compute": compute, "store": 0},
                "products": 0}
    m, k, w_bits, acc_bits = cfg["m"], cfg["k"], cfg["w_bits"], cfg["acc_bits"]
    mac_depth = MEM_READ + DECODE_MUL + _clog2(simd) + PART_ADD
    requant_depth = SCALE_MUL + 3  # acc * M, two rounding shifts and the clamp
    tile = (k // simd + mac_depth + LOOP_OVERHEAD) + (pe + requant_depth)
    compute = oh * (ow * (m // pe) * tile + LOOP_OVERHEAD)
    latency = FUNC_OVERHEAD + fill + compute
    products = pe * simd
    dsp, lut_pe = 0, 0
    if uses_dsp(w_bits, 9):
        dsp += products * dsp_per_product(w_bits, 9)
    else:
        lut_pe += simd * lut_per_product(w_bits, 9)
    requants = 2 if cfg["residual"] else 1
    dsp += pe * requants * dsp_per_product(32, 32)
    lut_pe += (w_bits + 9) * (2 * simd - 1) + acc_bits  # adder tree + accumulator (FINN-R)
    lut_pe += requants * 64 + 2 * 8                       # assumption: shifts, rounding, clamp
    mems = [memory(w_bits, math.ceil(m * k / products), products),
            memory(32, m // pe, pe), memory(32, m // pe, pe), memory(6, m // pe, pe), lb]
    lut = FINN_C0 + FINN_C1 * pe * lut_pe + sum(x["LUT"] for x in mems)
    ff = FF_CONTROL + pe * (simd * (w_bits + 9) + acc_bits + 64 * requants) + simd * 9
    return {"BestLatency": latency, "WorstLatency": latency, "IntervalMin": latency + 1,
            "DSP": dsp, "BRAM_18K": sum(x["BRAM_18K"] for x in mems), "URAM": 0,
            "LUT": int(math.ceil(lut)), "FF": ff, "pe": pe, "simd": simd,
            "cycles": {"load": fill, "compute": compute, "store": 0}, "products": products,
            "weight_banks": {"width": w_bits, "depth": math.ceil(m * k / products),
                             "count": products}}


def estimate_layer(cfg: dict, pe: int, simd: int) -> dict:
    """Cycles per input vector and resources of one layer at (pe, simd).

    ``cfg`` is the ``config`` of a qmatmul after ``hls-fixed-point``. Besides the report keys,
    the result holds ``pe``, ``simd``, ``cycles`` (load/compute/store parts of the latency),
    ``products`` (code x activation multipliers) and ``weight_banks`` (width, depth, count).
    """
    if cfg.get("kind") in ("conv", "pool", "dup"):
        return estimate_stream_layer(cfg, pe, simd)
    _check(cfg, pe, simd)
    n, k, kp = cfg["n"], cfg["k"], cfg["k_padded"]
    groups, cpw, wpg = cfg["groups"], cfg["codes_per_word"], cfg["words_per_group"]
    tiles, steps = n // pe, wpg // simd
    lanes = simd * cpw                 # products per PE per cycle
    q_w, x_w = cfg["bits"] + 1, cfg["x_width"]   # (code - zp) is signed: bits + 1
    part_w, scale_w, acc_w = cfg["part_width"], cfg["scale_width"], cfg["acc_width"]

    # ---- latency: straight from the loop nest (module docstring) ----
    load = k + LOAD_DEPTH
    if kp > k:
        load += (kp - k) + LOAD_DEPTH     # the separate zero-padding loop
    word_depth = MEM_READ + DECODE_MUL + _clog2(lanes) + PART_ADD  # one adder level a cycle
    group_cycles = steps + word_depth + SCALE_MUL + ACC_ADD + LOOP_OVERHEAD
    compute = tiles * (groups * group_cycles + LOOP_OVERHEAD)
    store = tiles * (pe + STORE_DEPTH)
    latency = FUNC_OVERHEAD + load + compute + store

    # ---- multipliers (hls4ml: every product unrolled in one cycle is its own multiplier) ----
    products = pe * lanes
    dsp, lut_pe = 0, 0
    if uses_dsp(q_w, x_w):
        dsp += products * dsp_per_product(q_w, x_w)
    else:
        lut_pe += lanes * lut_per_product(q_w, x_w)
    if uses_dsp(part_w, scale_w):
        dsp += pe * dsp_per_product(part_w, scale_w)
    else:
        lut_pe += lut_per_product(part_w, scale_w)

    # ---- LUT datapath per PE (FINN-R terms, with SIMD -> lanes) ----
    lut_pe += lanes * q_w                        # assumption: code - zp, one LUT per bit
    lut_pe += (q_w + x_w) * (2 * lanes - 1)      # FINN-R adder tree
    lut_pe += part_w + acc_w                     # FINN-R accumulator: part, then acc
    lut = FINN_C0 + FINN_C1 * pe * lut_pe
    lut += acc_w + cfg["y_width"]                # assumption: the shared bias/relu/cast stage

    # ---- memories: the template's ARRAY_PARTITION factors give the bank counts ----
    w_depth = tiles * (groups * wpg) // simd     # W[n][k_words]: cyclic pe (dim 1), simd (dim 2)
    mems = [
        memory(WORD_BITS, w_depth, pe * simd),       # packed weight codes
        memory(scale_w, tiles * groups, pe),         # S[n][groups]
        memory(q_w, tiles * groups, pe),             # Z[n][groups] (ap_int<bits + 1>)
        memory(acc_w, tiles, pe),                    # B[n]
        memory(x_w, math.ceil(kp / lanes), lanes),   # x[k_padded]: cyclic lanes
    ]
    bram = sum(m["BRAM_18K"] for m in mems)
    lut += sum(m["LUT"] for m in mems)

    # ---- FF: assumption, one register per pipeline stage's datapath bits ----
    ff_pe = (simd * WORD_BITS                    # weight words read
             + lanes * (q_w + x_w)               # product registers
             + (q_w + x_w) * (lanes - 1)         # adder-tree level registers
             + part_w + (part_w + scale_w) + acc_w)  # part, scaled product, acc
    ff = FF_CONTROL + pe * ff_pe + lanes * x_w + acc_w + cfg["y_width"]

    return {
        "BestLatency": latency, "WorstLatency": latency,
        # Assumption (how csynth reports a function that is not pipelined): it can take the
        # next vector one cycle after it finishes, interval = latency + 1.
        "IntervalMin": latency + 1,
        "DSP": dsp, "BRAM_18K": bram, "URAM": 0, "LUT": int(math.ceil(lut)), "FF": ff,
        "pe": pe, "simd": simd,
        "cycles": {"load": load, "compute": compute, "store": store},
        "products": products,
        "weight_banks": {"width": WORD_BITS, "depth": w_depth, "count": pe * simd},
    }


def estimate_design(layers: list) -> dict:
    """Totals of a DATAFLOW chain of layers, given as ``(cfg, pe, simd)`` tuples.

    Latency adds the layers and a FIFO hop per stream (input, between layers, output): a
    conservative bound, since a layer's load already overlaps its producer's stores. The
    interval is the slowest layer's (DATAFLOW overlaps the layers on successive vectors).
    """
    per_layer = [estimate_layer(cfg, pe, simd) for cfg, pe, simd in layers]
    out = {r: sum(e[r] for e in per_layer) for r in RESOURCES}
    latency = sum(e["BestLatency"] for e in per_layer) + STREAM_HOP * (len(per_layer) + 1)
    out.update({
        "BestLatency": latency, "WorstLatency": latency,
        "IntervalMin": max((e["IntervalMin"] for e in per_layer), default=0),
        "layers": per_layer,
    })
    return out


# ---- choosing PE and SIMD ------------------------------------------------------------------


def _divisors(x: int) -> list[int]:
    return [d for d in range(1, x + 1) if x % d == 0]


def _grow(value: int, limit: int) -> int | None:
    """The smallest divisor of ``limit`` at least twice ``value`` (or ``limit``), else None."""
    if value >= limit:
        return None
    return min(d for d in _divisors(limit) if d >= min(2 * value, limit))


def _over_budget(est: dict, budget: dict, utilization: float) -> list[str]:
    """Resources of ``est`` above ``utilization`` of ``budget``, as readable phrases."""
    over = []
    for r in RESOURCES:
        if r in budget and est[r] > utilization * budget[r]:
            over.append(f"{r} = {est[r]} > {utilization * budget[r]:g} "
                        f"({utilization:.0%} of {budget[r]})")
    return over


def _cost(est: dict, budget: dict, utilization: float) -> tuple[float, float]:
    """(largest, summed) fraction of the allowed amount used, over the budgeted resources."""
    fractions = []
    for r in RESOURCES:
        allowed = utilization * budget.get(r, math.inf)
        fractions.append(est[r] / allowed if allowed > 0 else (math.inf if est[r] else 0.0))
    return max(fractions), sum(fractions)


def choose_parallelism(cfgs: list, budget: dict, utilization: float = 0.8,
                       max_pe: int | None = None) -> list[tuple[int, int]]:
    """(pe, simd) per layer: the smallest design interval, then latency, within the budget.

    ``budget`` maps resource names (``DSP``, ``BRAM_18K``, ``URAM``, ``LUT``, ``FF``) to the
    part's amounts; a missing resource is unconstrained. Greedy and deterministic: all layers
    start at (1, 1); the bottleneck layer (largest IntervalMin, first on ties) grows its pe or
    its simd to the next divisor at least twice as large, whichever costs less (the largest
    fraction of any budget used after the step) among those that fit and make it faster;
    when the bottleneck cannot grow, the other layers grow, longest first, to cut latency.
    Raises ValueError when even (1, 1) everywhere exceeds the budget.
    """
    par = [(1, 1)] * len(cfgs)
    est = estimate_design([(c, pe, simd) for c, (pe, simd) in zip(cfgs, par)])
    over = _over_budget(est, budget, utilization)
    if over:
        raise ValueError(f"the smallest HLS design (pe=1, simd=1 in all {len(cfgs)} layers) "
                         f"does not fit: {'; '.join(over)}")

    def grow(i: int):
        """The cheapest fitting step that makes layer i faster, as (par, est), or None."""
        cfg, (pe, simd) = cfgs[i], par[i]
        options = []
        new_pe = _grow(pe, cfg["n"])
        if new_pe is not None and (max_pe is None or new_pe <= max_pe):
            options.append((new_pe, simd))
        new_simd = _grow(simd, cfg["words_per_group"])
        if new_simd is not None:
            options.append((pe, new_simd))
        best = None
        for order, option in enumerate(options):  # order: pe before simd on equal cost
            trial = par[:i] + [option] + par[i + 1:]
            trial_est = estimate_design([(c, p, s) for c, (p, s) in zip(cfgs, trial)])
            if trial_est["layers"][i]["BestLatency"] >= est["layers"][i]["BestLatency"]:
                continue
            if _over_budget(trial_est, budget, utilization):
                continue
            key = (_cost(trial_est, budget, utilization), trial_est["IntervalMin"], order)
            if best is None or key < best[0]:
                best = (key, trial, trial_est)
        return None if best is None else best[1:]

    # Phase 1: the interval. Only the bottleneck layer's growth can lower it.
    while cfgs:
        intervals = [e["IntervalMin"] for e in est["layers"]]
        step = grow(intervals.index(max(intervals)))
        if step is None:
            break
        par, est = step
    # Phase 2: the latency, with what the budget still allows (the interval cannot rise).
    while True:
        order = sorted(range(len(cfgs)), key=lambda i: (-est["layers"][i]["BestLatency"], i))
        step = next((s for s in map(grow, order) if s is not None), None)
        if step is None:
            break
        par, est = step
    return par
