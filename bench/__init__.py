"""The benchmark harness: ``python -m bench`` measures mmproxy against no proxy and its peers.

Everything runs in a private network namespace the harness makes and deletes.  The load
generator and the backends are one small C program (``loadgen.c``) compiled at run time, so
that neither is the bottleneck; the proxies run as operators run them, as processes.  See
``bench/README.md``.

Modules, one job each:

* ``settings``  the run's settings and targets, validated from the command line (``cli``)
* ``build``     compiles ``loadgen.c`` into a cache outside the checkout
* ``freethreaded`` builds a free-threaded CPython into that cache (``--free-threaded``)
* ``interpreters`` checks that an interpreter can run mmproxy; the free-threaded one's venv
* ``netns``     the private namespace: create, run inside, delete
* ``procs``     the processes the harness starts, their /proc figures, and killing them
* ``targets``   starting a proxy (mmproxy or a peer) and waiting until it accepts
* ``workloads`` what each workload runs and the figures it yields
* ``runner``    the measurement loop (targets alternate) and the progress line
* ``stats``     medians, ratios and number formatting
* ``report``    the table, the JSON document and the machine description
* ``chart``     the PNG bar chart (matplotlib, optional)
"""
