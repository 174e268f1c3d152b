"""The id of the installed build: the native `ndf-sandbox` program (cli_client.c)
talks only to a CLI server of the same build."""

BUILD_ID = ""  # the installed build's id, written by setup.py; "" in a source checkout
