"""The HTTP service of ``knnlm serve``: ``app`` (routes, errors, the API key), ``batcher``
(the model's one worker thread, batching concurrent requests) and ``schemas`` (the bodies)."""
