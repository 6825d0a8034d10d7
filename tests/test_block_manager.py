from scheduler_svc.block_manager import BlockManager, chain_hash
from scheduler_svc.kv_events import BlockRemoved, BlockStored, CacheCleared
from scheduler_svc.sampling_params import SamplingParams
from scheduler_svc.sequence import Sequence


def seq(tokens: list[int], sid: int = 0) -> Sequence:
    return Sequence(sid, list(tokens), SamplingParams(max_tokens=8), max_len=len(tokens) + 8)


def test_chain_hash_depends_on_prefix_and_tokens() -> None:
    assert chain_hash(0, [1, 2]) == chain_hash(0, [1, 2])
    assert chain_hash(0, [1, 2]) != chain_hash(0, [2, 1])
    assert chain_hash(1, [1, 2]) != chain_hash(0, [1, 2])


def test_grow_release_and_refcounts() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq(list(range(10)))
    bm.admit(a, [])
    assert bm.grow(a, 10) is not None and len(a.block_table) == 3
    assert bm.num_free == 1
    assert bm.grow(a, 17) is None  # needs 2 more, 1 free: nothing taken
    assert len(a.block_table) == 3 and bm.num_free == 1
    bm.release(a)
    assert bm.num_free == 4 and all(b.ref_count == 0 for b in bm.blocks)


def test_prefix_reuse_shares_blocks_and_leaves_one_token() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(list(range(12)))  # 3 full blocks
    bm.admit(a, bm.match(a))
    bm.grow(a, 12)
    a.num_computed = 12
    bm.commit(a)
    b = seq(list(range(8)) + [99, 98, 97, 96, 95], sid=1)
    hit = bm.match(b)
    assert hit == a.block_table[:2]
    bm.admit(b, hit)
    assert b.num_computed == 8 and b.num_cached_tokens == 8
    assert all(bm.blocks[x].ref_count == 2 for x in hit)
    # An identical prompt hits all but its last block: at least one token must be computed.
    c = seq(list(range(12)), sid=2)
    assert bm.match(c) == a.block_table[:2]


def test_freed_blocks_stay_cached_until_reused() -> None:
    bm = BlockManager(num_blocks=3, block_size=2)
    a = seq([1, 2, 3, 4, 5])
    bm.admit(a, [])
    bm.grow(a, 5)
    a.num_computed = 5
    bm.commit(a)
    first = list(a.block_table)
    bm.release(a)
    assert bm.num_free == 3
    b = seq([1, 2, 3, 4, 9], sid=1)
    hit = bm.match(b)
    assert hit == first[:2]
    assert bm.admit_cost(hit, 1) == 3  # hit blocks in the free list count against the free ones
    bm.admit(b, hit)
    assert bm.num_free == 1


def test_reusing_a_freed_block_evicts_its_hash() -> None:
    bm = BlockManager(num_blocks=2, block_size=2)
    a = seq([1, 2, 3, 4])
    bm.admit(a, [])
    bm.grow(a, 4)
    a.num_computed = 4
    bm.commit(a)
    bm.release(a)
    assert len(bm.cached) == 2
    c = seq([7, 7, 7], sid=2)
    bm.admit(c, bm.match(c))
    bm.grow(c, 3)
    assert bm.cached == {} and all(b.hash is None for b in bm.blocks)
    assert bm.match(seq([1, 2, 3, 4, 5], sid=3)) == []


def test_uncomputed_or_unknown_blocks_are_not_committed() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq(list(range(8)))
    bm.admit(a, [])
    bm.grow(a, 8)
    a.num_computed = 4  # only the first block is computed
    bm.commit(a)
    assert len(bm.cached) == 1
    b = seq(list(range(8)) + [1], sid=1)
    assert bm.match(b) == a.block_table[:1]


def test_prefix_caching_off() -> None:
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    a = seq([1, 2, 3])
    bm.admit(a, [])
    bm.grow(a, 3)
    a.num_computed = 3
    bm.commit(a)
    assert bm.match(seq([1, 2, 3], sid=1)) == [] and not bm.cached


def test_events_name_stored_blocks_with_parent_and_tokens_then_evictions() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    seq = Sequence(0, list(range(9)), SamplingParams(), 12)
    bm.admit(seq, bm.match(seq))
    bm.grow(seq, 9)
    seq.num_computed = 9
    bm.commit(seq)
    h = seq.block_hashes
    assert bm.take_events() == (
        BlockStored(h[0], None, (0, 1, 2, 3)),
        BlockStored(h[1], h[0], (4, 5, 6, 7)),
    )
    assert not bm.flush()  # blocks in use: nothing flushed
    bm.release(seq)
    other = Sequence(1, [50] * 9, SamplingParams(), 12)
    bm.admit(other, bm.match(other))
    bm.grow(other, 9)  # takes the free block, then the two cached ones, tail first
    assert bm.take_events() == (BlockRemoved(h[1]), BlockRemoved(h[0]))
    bm.release(other)
    assert bm.flush() and bm.take_events() == (CacheCleared(),) and not bm.cached
