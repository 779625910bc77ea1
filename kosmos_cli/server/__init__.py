"""`kosmos serve`: one loaded model behind an HTTP API (FastAPI on uvicorn).

    HTTP (app.py) --upload--> Service.accept (service.py): checked, saved, counted --> a job on disk
    job thread: api.transcribe_files(upload, -f json, runner=its lane) --> sharing.SharedModel
        (every job's pages in one running batch, page by page in turn) --> the job's JSON output

- `service`: jobs on disk (upload, request, progress log, JSON), resumed at start, expiring after
  `--keep`; results in any format rendered from the JSON as `kosmos convert` renders them;
- `app`: the routes, the key, upload limits, errors as JSON; `chat`: the OpenAI-compatible route;
- `metrics`: Prometheus counters and histograms; `page.html`: the page at `GET /`.
"""
