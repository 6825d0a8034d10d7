"""The vLLM engine service (vllm.grpc.engine.VllmEngine, stubs from smg-grpc-proto) that gateways
such as SMG speak: token ids in, token ids out. A thin translator over the same Engine as
nanovllm.v1 (servicer.py); the conversions are in vllm_convert.py."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import grpc
from smg_grpc_proto.generated import common_pb2 as cpb
from smg_grpc_proto.generated import vllm_engine_pb2 as vpb
from smg_grpc_proto.generated import vllm_engine_pb2_grpc as vpbg

from scheduler_svc import vllm_convert as conv
from scheduler_svc.engine import Engine
from scheduler_svc.errors import SubscriberLagged, Unsupported, WorkerUnavailable
from scheduler_svc.messages import CoreInfo
from scheduler_svc.request import Output

TOKENIZER_CHUNK = 64 * 1024


def _version() -> str:
    try:
        return version("nanovllm-grpc")
    except PackageNotFoundError:
        return "0+unknown"


class VllmEngineServicer(vpbg.VllmEngineServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.model_name = engine.config.model_name
        self.model_dir = engine.config.model
        self.started = time.time()
        self.config = json.loads((Path(self.model_dir) / "config.json").read_text())

    def _info(self) -> CoreInfo:
        if self.engine.info is None:
            raise WorkerUnavailable("the workers are still loading the model")
        return self.engine.info

    async def Generate(
        self, request: vpb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[vpb.GenerateResponse]:
        conv.check_supported(request)
        prompt = await conv.prompt_ids(request, self.engine.prompts)
        params = conv.to_params(request.sampling_params, len(prompt), self._info().max_model_len)
        sp = request.sampling_params
        num_top = sp.logprobs if sp.HasField("logprobs") else 0
        stream = self.engine.generate(request.request_id or uuid.uuid4().hex, prompt, params)
        outputs: dict[int, Output] = {}  # without `stream`, each sample's tokens until it ends
        try:
            async for out in stream:
                if request.stream:
                    yield conv.chunk(out, len(prompt), num_top)
                    if out.finish_reason is not None:
                        yield conv.complete(out, params, num_top)
                    continue
                whole = outputs.setdefault(out.index, Output(out.index))
                whole.merge(out)
                if whole.finish_reason is not None:
                    yield conv.complete(whole, params, num_top)
        finally:
            await stream.aclose()  # on cancel or disconnect too: aborts and frees the blocks at once

    async def Abort(self, request: vpb.AbortRequest, context: grpc.aio.ServicerContext) -> vpb.AbortResponse:
        for request_id in request.request_ids:
            self.engine.cancel(request_id)
        return vpb.AbortResponse()

    async def HealthCheck(
        self, request: vpb.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> vpb.HealthCheckResponse:
        e = self.engine
        if e.dead is not None:
            return vpb.HealthCheckResponse(healthy=False, message=f"the engine stopped: {e.dead}")
        if e.draining:
            return vpb.HealthCheckResponse(healthy=False, message="shutting down")
        if e.info is None:
            return vpb.HealthCheckResponse(healthy=False, message="the workers are still loading the model")
        if e.lost is not None:
            return vpb.HealthCheckResponse(healthy=False, message=f"a worker rank is lost, recovering: {e.lost}")
        return vpb.HealthCheckResponse(healthy=True, message="serving")

    async def GetModelInfo(
        self, request: vpb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> vpb.GetModelInfoResponse:
        info, cfg = self._info(), self.config
        return vpb.GetModelInfoResponse(
            model_path=self.model_dir,
            is_generation=True,
            max_context_length=info.max_model_len,
            vocab_size=info.vocab_size,
            served_model_name=self.model_name,
            tokenizer_path=self.model_dir,
            model_type=cfg.get("model_type", ""),
            architectures=cfg.get("architectures", []),
            eos_token_ids=sorted(self.engine.eos_token_ids),
            pad_token_id=cfg.get("pad_token_id") or 0,
            bos_token_id=cfg.get("bos_token_id") or 0,
            max_req_input_len=info.max_model_len - 1,
        )

    async def GetServerInfo(
        self, request: vpb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> vpb.GetServerInfoResponse:
        info = self._info()
        return vpb.GetServerInfoResponse(
            active_requests=len(self.engine.by_request_id),
            is_paused=self.engine.draining,
            uptime_seconds=time.time() - self.started,
            server_type="nanovllm-grpc",
            data_parallel_size=1,
            block_size=info.block_size,
            max_num_seqs=self.engine.config.core.max_num_seqs or 0,  # 0: unknown (the workers' limit)
        )

    async def GetLoads(self, request: vpb.GetLoadsRequest, context: grpc.aio.ServicerContext) -> vpb.GetLoadsResponse:
        self._info()
        load = self.engine.load()
        assert load is not None
        info, stats = load.info, load.stats
        used = info.num_blocks - stats.blocks_free  # blocks a sequence holds; cached free ones are not load
        return vpb.GetLoadsResponse(
            timestamp=datetime.now(timezone.utc).isoformat(),
            version=_version(),
            dp_rank_count=1,
            loads=[
                vpb.SchedulerLoad(
                    dp_rank=0,
                    num_running_reqs=stats.running,
                    num_waiting_reqs=load.waiting,
                    num_total_reqs=stats.running + load.waiting,
                    num_used_tokens=used * info.block_size,
                    max_total_num_tokens=info.num_blocks * info.block_size,
                    token_usage=used / info.num_blocks,
                    cache_hit_rate=stats.hit_rate,
                    max_running_requests=self.engine.config.core.max_num_seqs or 0,
                )
            ],
        )

    async def GetTokenizer(
        self, request: cpb.GetTokenizerRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[cpb.GetTokenizerChunk]:
        data = conv.tokenizer_zip(self.model_dir)
        digest = hashlib.sha256(data).hexdigest()
        for start in range(0, len(data), TOKENIZER_CHUNK):
            end = start + TOKENIZER_CHUNK
            yield cpb.GetTokenizerChunk(data=data[start:end], sha256=digest if end >= len(data) else "")

    async def FlushCache(
        self, request: cpb.FlushCacheRequest, context: grpc.aio.ServicerContext
    ) -> cpb.FlushCacheResponse:
        self._info()
        ok, message = await self.engine.flush_cache(max(request.timeout_s, 0.0))
        return cpb.FlushCacheResponse(success=ok, message=message)

    async def SubscribeKvEvents(
        self, request: cpb.SubscribeKvEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[cpb.KvEventBatch]:
        block_size = self._info().block_size
        log = self.engine.kv
        first, queue = log.subscribe(request.start_sequence_number)
        event_id = 1
        try:
            for batch in first:
                yield conv.kv_batch(batch, block_size, event_id)
                event_id += len(batch.events)
            while (batch := await queue.get()) is not None:
                yield conv.kv_batch(batch, block_size, event_id)
                event_id += len(batch.events)
            raise SubscriberLagged("this subscriber fell behind the KV events; subscribe again from 0")
        finally:
            log.unsubscribe(queue)

    async def Embed(self, request: vpb.EmbedRequest, context: grpc.aio.ServicerContext) -> vpb.EmbedResponse:
        raise Unsupported("embeddings are not served: this engine runs generative models only")

    async def StartProfile(
        self, request: cpb.StartProfileRequest, context: grpc.aio.ServicerContext
    ) -> cpb.ProfileResponse:
        raise Unsupported("profiling through the gateway is not supported; see bench/profile_step.py")

    async def StopProfile(
        self, request: cpb.StopProfileRequest, context: grpc.aio.ServicerContext
    ) -> cpb.ProfileResponse:
        raise Unsupported("profiling through the gateway is not supported; see bench/profile_step.py")
