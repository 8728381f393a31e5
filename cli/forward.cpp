// PLACEHOLDER: replaced by the real subcommand (work in progress).
#include "cli/commands.h"
#include "formats/error.h"
namespace lora::cli {
CLI::App* setup_forward(CLI::App& app, runner& run) {
  auto* sub = app.add_subcommand("forward", "not built yet");
  sub->callback([&run] { run = [] () -> int { throw errors::usage("'forward' is not built yet"); }; });
  return sub;
}
}  // namespace lora::cli
