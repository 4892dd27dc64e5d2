"""The offline demo: synthetic proxy tasks with known answers, tiny proxy models trained on them on
CPU, and a pipeline that runs every analyzer on the trained proxies (``hpx-analyze demo``)."""
