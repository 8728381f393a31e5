// PLACEHOLDER: replaced by the real subcommand (work in progress).
#include "cli/commands.h"
#include "formats/error.h"
namespace lora::cli {
CLI::App* setup_verify(CLI::App& app, runner& run) {
  auto* sub = app.add_subcommand("verify", "not built yet");
  sub->callback([&run] { run = [] () -> int { throw errors::usage("'verify' is not built yet"); }; });
  return sub;
}
}  // namespace lora::cli
