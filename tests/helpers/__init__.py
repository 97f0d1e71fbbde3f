"""What the tests share: tiny configs and runs, step inputs, event readers, and the scripts tests run in
subprocesses (*_check.py). Imported as `helpers.<module>`; the scripts import their siblings by name."""
