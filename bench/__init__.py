"""The benchmark harness: ``make bench`` (``python -m bench``); see docs/performance.md.

A fake Ollama, the proxy and (when installed) HAProxy each run in their own process; this
process generates the load and measures every scenario once straight at the fake and once
through each proxy, then prints one table and writes it to ``bench/results/<UTC>.json``.

    cli          options, start-up, the run, the output
    children     the fake's and the proxy's processes (``fake_child``, ``proxy_child``)
    haproxy      HAProxy's configuration and process
    rpc          the JSON-lines control channel over the children's stdin and stdout
    targets      direct / proxy / HAProxy, and the fake's controls
    client       request bodies, sessions, requests in flight
    scenarios    one module per scenario
    report       rows, the table, the JSON file
    procfs, machine, stats, runtime, sampling   the small helpers (sampling: py-spy)
"""
