"""``executor=`` takes any concurrent.futures executor: a real dask cluster."""

from __future__ import annotations

from . import sweeps


def test_a_dask_local_cluster_computes_a_sweep() -> None:
    from distributed import Client, LocalCluster

    f = sweeps.cube
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            results = f.map(range(5), executor=client.get_executor(), progress=False)
    assert results == [0, 1, 8, 27, 64]
    assert all(sweeps.DASK_CACHE.contains(f.key(x)) for x in range(5))
