"""Tracing: where the time of a run went, on which rank, and who made the others wait.

    recorder.py  per-rank segment recorder (hot path; numpy only) and the segment codes
    clock.py     clock offsets between ranks (ping-pong) and the one alignment function
    session.py   TraceSession (the engine's calls: open, end_step, close, write_partial)
                 and write_trace (the HDF5 writer, usable without MPI)
    schema.py    the file layout and FORMAT_VERSION
    analysis.py  load_trace and the derived tables (waits, skew, straggler, time per token)
    report.py    trace_report      export.py  trace_export (Perfetto JSON)
    plot.py      trace_plot (imported only by the plot command)
    compare.py   trace_compare (a projection beside a measured run, too)
    project.py   the projection model: a trace replayed in another configuration
    project_report.py  trace_project: its flags, tables and grid

Importing this package imports nothing: the engine imports recorder and session, the
CLI imports the module of the command it runs. Nothing here imports mpi4py.
"""
