// The subcommands: each file cli/<cmd>.cpp holds an options struct, a setup
// function that registers the subcommand, and a run function that calls core
// once, renders the report and returns the exit code.
#pragma once

#include <CLI/CLI.hpp>

namespace lora::cli {

// Registers the subcommand on `app` and returns it; when the user picks it,
// `run` is set to a function that executes it and returns the exit code.
using runner = std::function<int()>;

CLI::App* setup_inspect(CLI::App& app, runner& run);
CLI::App* setup_merge(CLI::App& app, runner& run);
CLI::App* setup_extract(CLI::App& app, runner& run);
CLI::App* setup_verify(CLI::App& app, runner& run);
CLI::App* setup_forward(CLI::App& app, runner& run);
CLI::App* setup_resize(CLI::App& app, runner& run);
CLI::App* setup_combine(CLI::App& app, runner& run);
CLI::App* setup_convert(CLI::App& app, runner& run);

}  // namespace lora::cli
