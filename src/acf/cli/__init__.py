"""The `acf` command line (`main`) and its command groups; thin: parse options, call the library, print."""
