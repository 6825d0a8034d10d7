"""A KV-event subscriber as a gateway runs one: SubscribeKvEvents from 0, applied to a map of live blocks."""

from __future__ import annotations

import threading
import time

import grpc
from smg_grpc_proto.generated import common_pb2 as cpb
from smg_grpc_proto.generated import vllm_engine_pb2_grpc as vpbg

from scheduler_svc.block_manager import chain_hash


def unsigned(h: int) -> int:
    return h % 2**64


class KvSubscriber:
    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.call = vpbg.VllmEngineStub(self.channel).SubscribeKvEvents(cpb.SubscribeKvEventsRequest())
        self.live: dict[int, tuple[int | None, tuple[int, ...]]] = {}  # hash -> (parent hash, token ids)
        self.sequences: list[int] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for batch in self.call:
                with self.lock:
                    self.sequences.append(batch.sequence_number)
                    for e in batch.events:
                        self._apply(e)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                raise

    def _apply(self, e: cpb.KvCacheEvent) -> None:
        kind = e.WhichOneof("data")
        if kind == "stored":
            parent = unsigned(e.stored.parent_block_hash) if e.stored.HasField("parent_block_hash") else None
            for b in e.stored.blocks:
                self.live[unsigned(b.block_hash)] = (parent, tuple(b.token_ids))
                parent = unsigned(b.block_hash)
        elif kind == "removed":
            for h in e.removed.block_hashes:
                self.live.pop(unsigned(h), None)
        else:
            self.live.clear()

    def blocks(self) -> dict[int, tuple[int | None, tuple[int, ...]]]:
        with self.lock:
            return dict(self.live)

    def wait_for(self, cached: dict[int, int], timeout: float = 10.0) -> None:
        """Until the live blocks are exactly `cached`'s hashes; each block's tokens must hash to its hash."""
        deadline = time.monotonic() + timeout
        while True:
            live = self.blocks()
            if set(live) == set(cached):
                break
            assert time.monotonic() < deadline, f"events: {len(live)} blocks; block manager: {len(cached)}"
            time.sleep(0.02)
        for h, (parent, tokens) in live.items():
            assert chain_hash(parent or 0, list(tokens)) == h
        with self.lock:
            seqs = list(self.sequences)
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "batches are numbered without gaps"

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(timeout=10)
        self.channel.close()
