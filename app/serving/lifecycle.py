"""Placeholder until the serving engine lands: start/stop hooks called by app.main's lifespan."""


async def start(app) -> None:
    app.state.serving = None


async def stop(app) -> None:
    pass
