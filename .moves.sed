# handlers/ moved by role (issue 45). Run over Python, docs and openapi.yaml: sed -E -i -f .moves.sed FILES
# handlers/answer.py went on to engine/generation/answer.py (handlers reach it as engine.engine's
# `answer`, `AnswerStream`, `split_answer`; split_calls moved there from handlers/generation.py too).
# Dotted names (imports, mock.patch targets, openapi.yaml's x-*InfoFunc), longest first:
s/\bhandlers\.responses_protocol\b/handlers.wire.responses_protocol/g
s/\bhandlers\.messages_protocol\b/handlers.wire.messages_protocol/g
s/\bhandlers\.response_store\b/handlers.conversation.response_store/g
s/\bhandlers\.model_commands\b/handlers.commands.model_commands/g
s/\bhandlers\.config_file\b/handlers.commands.config_file/g
s/\bhandlers\.connections\b/handlers.asgi.connections/g
s/\bhandlers\.middleware\b/handlers.asgi.middleware/g
s/\bhandlers\.generation\b/handlers.conversation.generation/g
s/\bhandlers\.protocol\b/handlers.wire.protocol/g
s/\bhandlers\.security\b/handlers.asgi.security/g
s/\bhandlers\.settings\b/handlers.commands.settings/g
s/\bhandlers\.choices\b/handlers.conversation.choices/g
s/\bhandlers\.(conversation\.)?answer\b/engine.generation.answer/g
s/\bhandlers\.images\b/handlers.conversation.images/g
s/\bhandlers\.errors\b/handlers.wire.errors/g
s/\bhandlers\.serve\b/handlers.commands.serve/g
s/\bhandlers\.sse\b/handlers.wire.sse/g
# Paths written in docs and comments:
s#\bhandlers/responses_protocol\.py\b#handlers/wire/responses_protocol.py#g
s#\bhandlers/messages_protocol\.py\b#handlers/wire/messages_protocol.py#g
s#\bhandlers/response_store\.py\b#handlers/conversation/response_store.py#g
s#\bhandlers/model_commands\.py\b#handlers/commands/model_commands.py#g
s#\bhandlers/config_file\.py\b#handlers/commands/config_file.py#g
s#\bhandlers/connections\.py\b#handlers/asgi/connections.py#g
s#\bhandlers/middleware\.py\b#handlers/asgi/middleware.py#g
s#\bhandlers/generation\.py\b#handlers/conversation/generation.py#g
s#\bhandlers/protocol\.py\b#handlers/wire/protocol.py#g
s#\bhandlers/security\.py\b#handlers/asgi/security.py#g
s#\bhandlers/settings\.py\b#handlers/commands/settings.py#g
s#\bhandlers/choices\.py\b#handlers/conversation/choices.py#g
s#\bhandlers/(conversation/)?answer\.py\b#engine/generation/answer.py#g
s#\bhandlers/images\.py\b#handlers/conversation/images.py#g
s#\bhandlers/errors\.py\b#handlers/wire/errors.py#g
s#\bhandlers/serve\.py\b#handlers/commands/serve.py#g
s#\bhandlers/sse\.py\b#handlers/wire/sse.py#g
# 'from handlers import X' naming ONE moved module (optionally 'as Y'); a line naming several
# modules of different packages must be split by hand (see the imports in handlers/chat.py):
s/^([[:space:]]*)from handlers import responses_protocol([[:space:]]+as[[:space:]]+[A-Za-z_]+)?[[:space:]]*(#.*)?$/\1from handlers.wire import responses_protocol\2\3/
s/^([[:space:]]*)from handlers import messages_protocol([[:space:]]+as[[:space:]]+[A-Za-z_]+)?[[:space:]]*(#.*)?$/\1from handlers.wire import messages_protocol\2\3/
s/^([[:space:]]*)from handlers import response_store([[:space:]]+as[[:space:]]+[A-Za-z_]+)?[[:space:]]*(#.*)?$/\1from handlers.conversation import response_store\2\3/
s/^([[:space:]]*)from handlers import model_commands([[:space:]]+as[[:space:]]+[A-Za-z_]+)?[[:space:]]*(#.*)?$/\1from handlers.commands import model_commands\2\3/
s/^([[:space:]]*)from handlers import config_file([[:space:]]+as[[:space:]]+[A-Za-z_]+)?[[:space:]]*(#.*)?$/\1from handlers.commands import config_file\2\3/
s/^([[:space:]]*)from handlers import connections([[:space:]]+as[[:space:]]+[A-Za-z_]+)?[[:space:]]*(#.*)?$/\1from handlers.asgi import connections\2\3/
s/^([[:space:]]*)from handlers import middleware([[:space:]]+as[[:space:]]+[A-Za-z_]+)?[[:space:]]*(#.*)?$/\1from handlers.asgi import middleware\2\3/
s/^([[:space:]]*)from handlers import generation([[:space:]]+as[[:space:]]+[A-Za-z_]+)?[[:space:]]*(#.*)?$/\1from handlers.conversation import generation\2\3/
s/^([[:space:]]*)from handlers import protocol([[:space:]]+as[[:space:]]+[A-Za-z_]+)?[[:space:]]*(#.*)?$/\1from handlers.wire import protocol\2\3/
s/^([[:space:]]*)from handlers import security([[:space:]]+as[[:space:]]+[A-Za-z_]+)?[[:space:]]*(#.*)?$/\1from handlers.asgi import security\2\3/
s/^([[:space:]]*)from handlers import settings([[:space:]]+as[[:space:]]+[A-Za-z_]+)?[[:space:]]*(#.*)?$/\1from handlers.commands import settings\2\3/
s/^([[:space:]]*)from handlers import choices([[:space:]]+as[[:space:]]+[A-Za-z_]+)?[[:space:]]*(#.*)?$/\1from handlers.conversation import choices\2\3/
s/^([[:space:]]*)from handlers import answer([[:space:]]+as[[:space:]]+[A-Za-z_]+)?[[:space:]]*(#.*)?$/\1from engine.engine import answer\2\3/
s/^([[:space:]]*)from handlers import images([[:space:]]+as[[:space:]]+[A-Za-z_]+)?[[:space:]]*(#.*)?$/\1from handlers.conversation import images\2\3/
s/^([[:space:]]*)from handlers import errors([[:space:]]+as[[:space:]]+[A-Za-z_]+)?[[:space:]]*(#.*)?$/\1from handlers.wire import errors\2\3/
s/^([[:space:]]*)from handlers import serve([[:space:]]+as[[:space:]]+[A-Za-z_]+)?[[:space:]]*(#.*)?$/\1from handlers.commands import serve\2\3/
s/^([[:space:]]*)from handlers import sse([[:space:]]+as[[:space:]]+[A-Za-z_]+)?[[:space:]]*(#.*)?$/\1from handlers.wire import sse\2\3/
