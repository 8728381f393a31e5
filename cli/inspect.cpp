// PLACEHOLDER: replaced by the real subcommand (work in progress).
#include "cli/commands.h"
#include "formats/error.h"
namespace lora::cli {
CLI::App* setup_inspect(CLI::App& app, runner& run) {
  auto* sub = app.add_subcommand("inspect", "not built yet");
  sub->callback([&run] { run = [] () -> int { throw errors::usage("'inspect' is not built yet"); }; });
  return sub;
}
}  // namespace lora::cli
