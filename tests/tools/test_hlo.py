"""Reading compiled HLO text: shapes and tile padding, the traffic walk (loops, async pairs,
conditionals, on-chip buffers) and its terms, against byte counts worked out by hand."""

import pytest

from gsa_flax.tools.sizing import hlo, traffic

# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
  'text, dims, nbytes, space',
  [
    ('f32[256,512]{1,0}', (256, 512), 256 * 512 * 4, 0),
    # bf16 tiles of 8x128: the last dimension 64 is padded to 128.
    ('bf16[32,56,56,64]{3,2,1,0:T(8,128)(2,1)}', (32, 56, 56, 64), 32 * 56 * 56 * 128 * 2, 0),
    # Minor-to-major {0,1}: dimension 0 is minor, the tiles pad [200, 3] to [200, 128];
    # {1,0} pads [3, 200] to [8, 256].
    ('f32[3,200]{0,1:T(8,128)}', (3, 200), 200 * 128 * 4, 0),
    ('f32[3,200]{1,0:T(8,128)}', (3, 200), 8 * 256 * 4, 0),
    ('f32[10]{0:T(256)}', (10,), 256 * 4, 0),
    ('f32[64]{0:T(128)S(1)}', (64,), 128 * 4, 1),
    ('pred[56,56]{1,0:T(8,128)(4,1)}', (56, 56), 56 * 128, 0),
    ('s32[]', (), 4, 0),
  ],
)
def test_parse_shape_pads_to_tiles_in_layout_order(text, dims, nbytes, space):
  (array,) = hlo.parse_shape(text)
  assert array.dims == dims
  assert array.nbytes == nbytes
  assert array.memory_space == space


def test_parse_shape_flattens_tuples():
  arrays = hlo.parse_shape('((bf16[4,8]{1,0}), f32[2]{0:T(256)}, u32[]{:S(2)})')
  assert [(a.dtype, a.dims, a.nbytes, a.memory_space) for a in arrays] == [
    ('bf16', (4, 8), 64, 0),
    ('f32', (2,), 1024, 0),
    ('u32', (), 4, 2),
  ]


# ----------------------------------------------------------------------------- HLO walk

# A hand-written module: tuple results, an async collective, a while loop with a known
# trip count, a fusion around a dot, a copy into on-chip memory. Byte counts by hand below.
_TRIP_COUNT = ', backend_config={"known_trip_count":{"n":"5"}}'
_MODULE = """HloModule walk

%fused_dot (p0: f32[4,8], p1: f32[8,16]) -> f32[4,16] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,16]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,16]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_pair (q0: f32[4,16]) -> (f32[4,16], f32[16,16]) {
  %q0 = f32[4,16]{1,0} parameter(0)
  %neg = f32[4,16]{1,0} negate(%q0)
  %gram = f32[16,16]{1,0} dot(%q0, %q0), lhs_contracting_dims={0}, rhs_contracting_dims={0}
  ROOT %both = (f32[4,16]{1,0}, f32[16,16]{1,0}) tuple(%neg, %gram)
}

%body (state: (s32[], f32[4,16])) -> (s32[], f32[4,16]) {
  %state = (s32[], f32[4,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  %acc = f32[4,16]{1,0} get-tuple-element(%state), index=1
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  %pair = (f32[4,16]{1,0}, f32[16,16]{1,0}) fusion(%acc), kind=kOutput, calls=%fused_pair
  %neg.1 = f32[4,16]{1,0} get-tuple-element(%pair), index=0
  ROOT %out = (s32[], f32[4,16]{1,0}) tuple(%next, %neg.1)
}

%cond (state.1: (s32[], f32[4,16])) -> pred[] {
  %state.1 = (s32[], f32[4,16]{1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%state.1), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%i.1, %n), direction=LT
}

ENTRY %main (x: f32[4,8], w: f32[8,16]) -> f32[8,16] {
  %x = f32[4,8]{1,0} parameter(0)
  %w = f32[8,16]{1,0} parameter(1)
  %fusion = f32[4,16]{1,0} fusion(%x, %w), kind=kOutput, calls=%fused_dot
  %zero = s32[] constant(0)
  %init = (s32[], f32[4,16]{1,0}) tuple(%zero, %fusion)
  %loop = (s32[], f32[4,16]{1,0}) while(%init), condition=%cond, body=%body TRIP_COUNT
  %res = f32[4,16]{1,0} get-tuple-element(%loop), index=1
  %flat = f32[64]{0} bitcast(%res)
  %ag-start = (f32[4,16]{1,0}, f32[8,16]{1,0}) all-gather-start(%res), dimensions={0}
  %ag-done = f32[8,16]{1,0} all-gather-done(%ag-start)
  %staged = f32[8,16]{1,0:S(1)} copy(%ag-done)
  ROOT %back = f32[8,16]{1,0} copy(%staged)
}
""".replace(' TRIP_COUNT', _TRIP_COUNT)


def test_hlo_walk_counts_top_level_buffers_loops_and_async_pairs():
  costs = traffic.hlo_costs(_MODULE)
  f32 = 4
  fusion = (4 * 8 + 8 * 16 + 4 * 16) * f32  # reads x and w, writes [4, 16]
  # Per iteration: the scalar add (2 reads + 1 write) and the two-output fusion (reads acc,
  # writes both results); the condition's compare (two s32 reads, one pred write).
  body = 3 * 4 + (4 * 16 + 4 * 16 + 16 * 16) * f32
  cond = 2 * 4 + 1
  gather = 4 * 16 * f32 + 8 * 16 * f32  # the start reads the shard, the done writes it all
  copies = 8 * 16 * f32 + 8 * 16 * f32  # HBM -> on-chip (read only), on-chip -> HBM (write)
  assert costs['hbm_bytes'] == fusion + 5 * (body + cond) + gather + copies
  assert costs['onchip_bytes'] == 2 * 8 * 16 * f32  # the staged buffer, written and read
  # Dots inside fusions count, the loop's five times.
  assert costs['matmul_flops'] == 2 * 4 * 16 * 8 + 5 * (2 * 16 * 16 * 4)
  assert costs['unknown_trip_counts'] == 0
  assert costs['collectives'] == {'all-gather': 1}


def test_hlo_walk_counts_a_loop_without_trip_count_once_and_says_so():
  text = _MODULE.replace(_TRIP_COUNT, '')
  costs = traffic.hlo_costs(text)
  assert costs['unknown_trip_counts'] == 1
  assert costs['matmul_flops'] == 2 * 4 * 16 * 8 + 2 * 16 * 16 * 4


def test_hlo_walk_takes_the_costlier_branch_of_a_conditional():
  text = """HloModule cond

%small (a: f32[16]) -> f32[16] {
  %a = f32[16]{0} parameter(0)
  ROOT %n = f32[16]{0} negate(%a)
}

%large (b: f32[16]) -> f32[16] {
  %b = f32[16]{0} parameter(0)
  %e = f32[16]{0} exponential(%b)
  ROOT %m = f32[16]{0} multiply(%e, %b)
}

ENTRY %main (p: pred[], x: f32[16]) -> f32[16] {
  %p = pred[] parameter(0)
  %x = f32[16]{0} parameter(1)
  ROOT %c = f32[16]{0} conditional(%p, %x, %x), true_computation=%small, false_computation=%large
}
"""
  # The large branch: exponential (64 read + 64 written), multiply (2 x 64 read + 64).
  assert traffic.hlo_costs(text)['hbm_bytes'] == 2 * 64 + 3 * 64


def test_traffic_by_instruction_adds_up_to_the_total_largest_first():
  rows = traffic.traffic_by_instruction(_MODULE)
  assert sum(r.hbm_bytes for r in rows) == traffic.hlo_costs(_MODULE)['hbm_bytes']
  assert [r.hbm_bytes for r in rows] == sorted((r.hbm_bytes for r in rows), reverse=True)
  by_name = {r.name: r for r in rows}
  # The loop body's fusion runs 5 times: reads acc, writes both results, each time.
  assert by_name['pair'].executions == 5
  assert by_name['pair'].hbm_bytes == 5 * (4 * 16 + 4 * 16 + 16 * 16) * 4
  assert by_name['fusion'].opcode == 'fusion' and by_name['fusion'].executions == 1
  assert 'x' not in by_name  # a parameter moves nothing
  # Into on-chip memory: only the read from HBM counts; back out: only the write.
  assert by_name['staged'].hbm_bytes == by_name['back'].hbm_bytes == 8 * 16 * 4
