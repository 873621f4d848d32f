"""The `flux2-accel` command line: main (the subcommands), args (torch-free arguments), and each subcommand's
runner (generate, calibrate-teacache, bench); the server and queue runners live in serve/."""
