"""The web console's files: static/ (the page, its ES modules and stylesheet, served as they are)
and package.json + package-lock.json (its charting library, installed by `npm ci` into
node_modules/). Served by app/api/console.py; described in docs/CONSOLE.md."""
