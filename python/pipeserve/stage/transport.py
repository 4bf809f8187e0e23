"""How the PP loops move tensor dicts: the asynchronous path, or the synchronous baseline.

Both expose `expect` (say which message comes next), `complete` (get it) and `send`. The
asynchronous transport posts every receive at `expect` and only waits at `complete`; the
synchronous one posts nothing ahead and, at `complete`, receives and waits tensor by tensor, as
SGLang 0.5.x does. The sync transport exists only as a benchmark baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeserve.distributed import Channel, GroupCoordinator
from pipeserve.distributed.sync_baseline import recv_tensor_dict_sync


@dataclass
class Expected:
    channel: Channel
    src: int
    gather_group: GroupCoordinator | None
    gather_keys: dict[str, bool] | None
    handles: list[Any] | None = None
    postprocess: Any = None


class AsyncTransport:
    def __init__(self, pp: GroupCoordinator) -> None:
        self.pp = pp

    def expect(
        self,
        channel: Channel,
        src: int,
        gather_group: GroupCoordinator | None = None,
        gather_keys: dict[str, bool] | None = None,
        into: dict | None = None,
    ) -> Expected:
        _, handles, post = self.pp.irecv_tensor_dict(src, gather_group, gather_keys, channel, into)
        return Expected(channel, src, gather_group, gather_keys, handles, post)

    def complete(self, expected: Expected, timeout_s: float) -> dict:
        for h in expected.handles:
            h.wait(timeout_s)
        return expected.postprocess()

    def send(
        self,
        tensor_dict: dict,
        channel: Channel,
        dst: int,
        gather_group: GroupCoordinator | None = None,
        gather_keys: dict[str, bool] | None = None,
    ) -> list[Any]:
        return self.pp.isend_tensor_dict(tensor_dict, dst, gather_group, gather_keys, channel)


class SyncTransport(AsyncTransport):
    def expect(
        self,
        channel: Channel,
        src: int,
        gather_group: GroupCoordinator | None = None,
        gather_keys: dict[str, bool] | None = None,
        into: dict | None = None,
    ) -> Expected:
        return Expected(channel, src, gather_group, gather_keys)  # the baseline allocates

    def complete(self, expected: Expected, timeout_s: float) -> dict:
        # NOTE: a gloo wait that runs out closes its connection, so the baseline cannot wait in
        # slices between liveness checks; it waits as long as the header frames do, and a dead
        # peer still ends the wait when its connection closes.
        return recv_tensor_dict_sync(
            self.pp,
            expected.src,
            expected.gather_group,
            expected.gather_keys,
            expected.channel,
            self.pp.header_timeout_s,
        )

    def send(
        self,
        tensor_dict: dict,
        channel: Channel,
        dst: int,
        gather_group: GroupCoordinator | None = None,
        gather_keys: dict[str, bool] | None = None,
    ) -> list[Any]:
        # NOTE: posted without waiting, like SGLang's async sends: blocking sends would deadlock
        # the ring (stage 0 sending a proxy while the last stage sends tokens back).
        return self.pp.isend_tensor_dict(
            tensor_dict, dst, gather_group, gather_keys, channel, inline=False
        )


TRANSPORTS = {"async": AsyncTransport, "sync": SyncTransport}
